"""Units parsing and the typed config tree: defaults, files, environment, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcache.kvstore.config import (
    CpuTierConfig,
    DiskTierConfig,
    KVCacheConfig,
    StoreConfig,
    default_store_dir,
    env_vars,
)
from kvcache.kvstore.errors import ConfigError
from kvcache.kvstore.units import (
    GiB,
    MiB,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

# ---------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * GiB),
        ("8gib", 8 * GiB),
        ("8 GiB", 8 * GiB),
        ("1.5GiB", 3 * GiB // 2),
        ("512MiB", 512 * MiB),
        ("1KiB", 1024),
        ("2TiB", 2 * 1024**4),
        ("1KB", 1000),
        ("3MB", 3_000_000),
        ("8GB", 8_000_000_000),
        ("1tb", 10**12),
        ("100B", 100),
        ("4096", 4096),
        (".5KiB", 512),
        (4096, 4096),
        (0, 0),
        (2048.0, 2048),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad", ["8 gigs", "8G", "GiB", "", "-1GiB", "1e9", "8 GiB B", True, -5, 1.5, None, [1]]
)
def test_parse_size_rejects_with_accepted_forms(bad: object) -> None:
    with pytest.raises(ConfigError) as e:
        parse_size(bad)  # type: ignore[arg-type]
    assert "GiB" in str(e.value) or "bytes" in str(e.value) or "negative" in str(e.value)


def test_parse_size_error_names_the_forms() -> None:
    with pytest.raises(
        ConfigError, match=r"'8 gigs' is not a size; use e\.g\. '8GiB' or 8589934592"
    ):
        parse_size("8 gigs")


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1024, "1 KiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (4 * GiB, "4 GiB"),
        (5 * GiB // 4, "1.25 GiB"),
        (2 * 1024**4, "2 TiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("30m", 1800.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("1w", 604800.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
        ("45", 45.0),
        (" 2H ", 7200.0),
        (12, 12.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["soon", "1x", "h", "-5s", "1 hour", "", True, None, float("inf")])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("seconds", [0.25, 1, 59, 90, 3600, 5400, 172800, 694861])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def test_format_duration_examples() -> None:
    assert format_duration(5400) == "1h30m"
    assert format_duration(90) == "1m30s"
    assert format_duration(2.5) == "2.5s"


# ---------------------------------------------------------------------------- defaults


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KVCACHE_DIR", raising=False)
    cfg = KVCacheConfig()
    assert cfg.store.dir == Path.home() / ".cache" / "kvcache"
    assert cfg.store.chunk_size == 256
    assert cfg.store.write_mode == "write-through"
    assert cfg.store.ttl is None
    assert cfg.store.cpu == CpuTierConfig(
        capacity=4 * GiB, codec="raw", policy="lru", pin_memory=None
    )
    assert cfg.store.disk.enabled is True
    assert cfg.store.disk.capacity == 64 * GiB
    assert cfg.store.disk.blob_storage == "files"
    assert cfg.store.disk_path == cfg.store.dir / "disk"
    assert cfg.log_level == "INFO"
    # Every section's default is independent (no shared mutable default).
    assert KVCacheConfig().store.cpu is not cfg.store.cpu

    monkeypatch.setenv("KVCACHE_DIR", str(tmp_path))
    assert default_store_dir() == tmp_path
    assert StoreConfig().dir == tmp_path


def test_to_dict_is_json_and_round_trips(tmp_path: Path) -> None:
    cfg = KVCacheConfig.from_dict(
        {"store": {"dir": str(tmp_path), "ttl": "1h", "disk": {"path": "/mnt/ssd/kv"}}}
    )
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["store"]["dir"] == str(tmp_path)
    assert d["store"]["ttl"] == 3600.0
    assert KVCacheConfig.from_dict(d) == cfg


def test_human_strings_are_normalised(tmp_path: Path) -> None:
    cfg = KVCacheConfig.from_dict(
        {
            "log_level": "debug",
            "store": {
                "dir": str(tmp_path),
                "chunk-size": "128",  # hyphens and string numbers, as env vars and YAML give
                "ttl": "2d",
                "cpu": {"capacity": "1.5GiB", "pin_memory": "false"},
                "disk": {"capacity": "500GB", "enabled": "no", "path": "blobs"},
            },
        }
    )
    assert cfg.log_level == "DEBUG"
    assert cfg.store.chunk_size == 128
    assert cfg.store.ttl == 172800.0
    assert cfg.store.cpu.capacity == 3 * GiB // 2
    assert cfg.store.cpu.pin_memory is False
    assert cfg.store.disk.capacity == 500 * 10**9
    assert cfg.store.disk.enabled is False
    # A relative disk path is relative to the store directory.
    assert cfg.store.disk_path == tmp_path / "blobs"
    assert DiskTierConfig(path=Path("/abs")).resolved_path(tmp_path) == Path("/abs")


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"store": {"cpu": {"capacity": "8 gigs"}}},
            r"store\.cpu\.capacity: '8 gigs' is not a size; use e\.g\. '8GiB' or 8589934592",
        ),
        ({"store": {"cpu": {"capacity": 0}}}, r"store\.cpu\.capacity: 0 bytes is too small"),
        ({"store": {"cpu": {"capacity": "1.5"}}}, r"store\.cpu\.capacity: '1\.5' is not a whole"),
        ({"store": {"cpu": {"capacity": "1000TiB"}}}, r"store\.cpu\.capacity: .* more than this"),
        ({"store": {"disk": {"capacity": 1e30}}}, r"store\.disk\.capacity: .* larger than any"),
        ({"store": {"disk": {"capacity": "512KiB"}}}, r"store\.disk\.capacity: 524288 bytes is"),
        ({"store": {"readonly": "maybe"}}, r"store\.readonly: 'maybe' is not a boolean"),
        ({"store": {"cpu": {"codec": "zip"}}}, r"store\.cpu\.codec: 'zip' is not one of: .*raw"),
        (
            {"store": {"cpu": {"policy": "mru"}}},
            r"store\.cpu\.policy: 'mru' is not one of: lfu, lru, s3fifo",
        ),
        (
            {"store": {"cpu": {"pin_memory": "maybe"}}},
            r"store\.cpu\.pin_memory: 'maybe' is not a boolean; use true, false or auto",
        ),
        (
            {"store": {"disk": {"blob_storage": "sqlite"}}},
            r"store\.disk\.blob_storage: 'sqlite' is not one of: files, lmdb",
        ),
        ({"store": {"disk": {"enabled": 3}}}, r"store\.disk\.enabled: 3 is not a boolean"),
        (
            {"store": {"write_mode": "write-around"}},
            r"store\.write_mode: 'write-around' is not one of: write-through, write-back",
        ),
        ({"store": {"chunk_size": 0}}, r"store\.chunk_size: 0 must be > 0"),
        ({"store": {"chunk_size": "many"}}, r"store\.chunk_size: 'many' is not an integer"),
        ({"store": {"ttl": "soon"}}, r"store\.ttl: 'soon' is not a duration; use e\.g\. '90s'"),
        ({"store": {"ttl": 0}}, r"store\.ttl: 0\.0 must be > 0"),
        ({"store": {"dir": None}}, r"store\.dir: must be set"),
        ({"store": {"cpu": "big"}}, r"store\.cpu: must be a table of keys \(capacity, codec"),
        ({"store": 5}, r"store: must be a table of keys"),
        ({"log_level": "loud"}, r"log_level: 'LOUD' is not one of: DEBUG, INFO"),
    ],
)
def test_invalid_values_name_the_key_and_the_fix(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KVCacheConfig.from_dict(data)


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ConfigError, match=r"store\.cpu\.policy"):
        CpuTierConfig(policy="fifo")
    assert CpuTierConfig(capacity="1GiB").capacity == GiB  # type: ignore[arg-type]
    assert StoreConfig(cpu={"codec": "raw"}).cpu == CpuTierConfig()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"stor": {}},
            r"unknown config key 'stor' in the top level \(did you mean 'store'\?\); "
            r"known keys: connector, log_level, server, store",
        ),
        (
            {"store": {"chunksize": 1}},
            r"unknown config key 'store\.chunksize' in section 'store'.*"
            r"known keys: chunk_size, cpu, dir, disk, key_scheme, readonly, remote, ttl, "
            r"write_mode",
        ),
        (
            {"store": {"cpu": {"size": "1GiB"}}},
            r"'store\.cpu\.size' in section 'store\.cpu'; "
            r"known keys: capacity, codec, pin_memory, policy",
        ),
        (
            {"store": {"disk": {"blob": "lmdb"}}},
            r"'store\.disk\.blob' .*known keys: blob_storage, capacity, codec, enabled, path",
        ),
    ],
)
def test_unknown_keys_list_the_known_ones(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KVCacheConfig.from_dict(data)


# ---------------------------------------------------------------------------- files

TOML = """
log_level = "warning"

[store]
dir = "{dir}"
chunk_size = 64
ttl = "30m"

[store.cpu]
capacity = "2GiB"
policy = "lfu"

[store.disk]
capacity = "10GiB"
blob_storage = "lmdb"
"""

YAML = """
store:
  dir: {dir}
  chunk_size: 64
  ttl: 30m
  cpu:
    capacity: 2GiB
    policy: lfu
  disk:
    capacity: 10GiB
    blob_storage: lmdb
log_level: warning
"""


@pytest.mark.parametrize(("name", "text"), [("kv.toml", TOML), ("kv.yaml", YAML), ("kv.yml", YAML)])
def test_from_file(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text.format(dir=tmp_path / "store"))
    cfg = KVCacheConfig.from_file(path)
    assert cfg.log_level == "WARNING"
    assert cfg.store.dir == tmp_path / "store"
    assert cfg.store.chunk_size == 64
    assert cfg.store.ttl == 1800.0
    assert cfg.store.cpu.capacity == 2 * GiB
    assert cfg.store.cpu.policy == "lfu"
    assert cfg.store.cpu.codec == "raw"  # unset keys keep their defaults
    assert cfg.store.disk.capacity == 10 * GiB
    assert cfg.store.disk.blob_storage == "lmdb"


def test_empty_yaml_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert KVCacheConfig.from_file(path) == KVCacheConfig()


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.toml", "[store\nchunk_size = 1", r"bad\.toml is not valid TOML"),
        ("bad.yaml", "store: [1, 2\n", r"bad\.yaml is not valid YAML"),
        ("list.yaml", "- 1\n- 2\n", r"the top level must be a table of keys, got list"),
        ("conf.json", "{}", r"unsupported config file type '\.json'; use a \.toml, \.yaml"),
        (
            "typo.toml",
            "[store.cpu]\ncapacity = '8 gigs'\n",
            r"typo\.toml: store\.cpu\.capacity: '8 gigs' is not a size",
        ),
        (
            "unknown.yaml",
            "store:\n  chunk: 4\n",
            r"unknown\.yaml: unknown config key 'store\.chunk'",
        ),
    ],
)
def test_from_file_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        KVCacheConfig.from_file(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*nope\.toml does not exist"):
        KVCacheConfig.from_file(tmp_path / "nope.toml")


# ---------------------------------------------------------------------------- environment


def test_env_map_is_derived_from_the_fields() -> None:
    m = env_vars()
    assert m["KVCACHE_DIR"] == ("store", "dir")
    assert m["KVCACHE_CHUNK_SIZE"] == ("store", "chunk_size")
    assert m["KVCACHE_WRITE_MODE"] == ("store", "write_mode")
    assert m["KVCACHE_TTL"] == ("store", "ttl")
    assert m["KVCACHE_CPU_CAPACITY"] == ("store", "cpu", "capacity")
    assert m["KVCACHE_CPU_PIN_MEMORY"] == ("store", "cpu", "pin_memory")
    assert m["KVCACHE_DISK_BLOB_STORAGE"] == ("store", "disk", "blob_storage")
    assert m["KVCACHE_DISK_PATH"] == ("store", "disk", "path")
    assert m["KVCACHE_LOG_LEVEL"] == ("log_level",)
    # One variable per leaf field, no more.
    assert m["KVCACHE_READONLY"] == ("store", "readonly")
    assert m["KVCACHE_REMOTE_URL"] == ("store", "remote", "url")
    assert m["KVCACHE_SERVER_TOKEN"] == ("server", "token")
    assert m["KVCACHE_CONNECTOR_SERVER"] == ("connector", "server")
    # store scalars + cpu + disk + remote + server + connector + log_level
    leaves = 6 + 4 + 6 + 8 + 13 + 8 + 1
    assert len(m) == leaves


def test_from_env(tmp_path: Path) -> None:
    env = {
        "KVCACHE_DIR": str(tmp_path),
        "KVCACHE_CHUNK_SIZE": "512",
        "KVCACHE_TTL": "1h",
        "KVCACHE_CPU_CAPACITY": "1GiB",
        "KVCACHE_CPU_PIN_MEMORY": "auto",
        "KVCACHE_DISK_BLOB_STORAGE": "lmdb",
        "KVCACHE_DISK_ENABLED": "false",
        "KVCACHE_LOG_LEVEL": "error",
        "KVCACHE_CONFIG": "",  # known, and not a field
        "PATH": "/usr/bin",  # not ours: ignored
    }
    cfg = KVCacheConfig.from_env(env)
    assert cfg.store.dir == tmp_path
    assert cfg.store.chunk_size == 512
    assert cfg.store.ttl == 3600.0
    assert cfg.store.cpu.capacity == GiB
    assert cfg.store.cpu.pin_memory is None
    assert cfg.store.disk.blob_storage == "lmdb"
    assert cfg.store.disk.enabled is False
    assert cfg.log_level == "ERROR"


def test_env_unset_ttl_overrides_file() -> None:
    base = KVCacheConfig.from_dict({"store": {"ttl": "1h"}})
    assert KVCacheConfig.from_env({"KVCACHE_TTL": "none"}, base=base).store.ttl is None


def test_unknown_env_var_is_rejected_with_the_known_ones() -> None:
    with pytest.raises(ConfigError) as e:
        KVCacheConfig.from_env({"KVCACHE_CPU_CAPACTY": "1GiB"})
    msg = str(e.value)
    assert "unknown environment variable KVCACHE_CPU_CAPACTY" in msg
    assert "did you mean 'KVCACHE_CPU_CAPACITY'?" in msg
    assert "KVCACHE_DISK_BLOB_STORAGE" in msg and "KVCACHE_CONFIG" in msg


def test_our_non_config_env_vars_are_accepted() -> None:
    cfg = KVCacheConfig.from_env(
        {"KVCACHE_NATIVE": "0", "KVCACHE_LMCACHE_PYTHON": "/x/python", "KVCACHE_TTL": "1h"}
    )
    assert cfg.store.ttl == 3600


def test_bad_env_value_names_the_variable_and_the_key() -> None:
    with pytest.raises(
        ConfigError,
        match=r"KVCACHE_DISK_BLOB_STORAGE='s3': store\.disk\.blob_storage: 's3' is not one of",
    ):
        KVCacheConfig.from_env({"KVCACHE_DISK_BLOB_STORAGE": "s3"})


def test_load_layers_defaults_file_env(tmp_path: Path) -> None:
    path = tmp_path / "kv.toml"
    path.write_text(TOML.format(dir=tmp_path / "from-file"))
    env = {"KVCACHE_CHUNK_SIZE": "32", "KVCACHE_CPU_POLICY": "s3fifo"}

    cfg = KVCacheConfig.load(path, environ=env)
    assert cfg.store.chunk_size == 32  # env beats file
    assert cfg.store.cpu.policy == "s3fifo"
    assert cfg.store.cpu.capacity == 2 * GiB  # file beats defaults
    assert cfg.store.dir == tmp_path / "from-file"
    assert cfg.store.write_mode == "write-through"  # defaults where neither says

    # $KVCACHE_CONFIG names the file when no path is given.
    via_env = KVCacheConfig.load(environ={**env, "KVCACHE_CONFIG": str(path)})
    assert via_env == cfg
    assert KVCacheConfig.load(environ={"KVCACHE_DIR": str(tmp_path)}).store.dir == tmp_path


def test_load_missing_file_from_env(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        KVCacheConfig.load(environ={"KVCACHE_CONFIG": str(tmp_path / "gone.yaml")})


def test_store_with_dir(tmp_path: Path) -> None:
    base = StoreConfig.from_dict({"chunk_size": 64, "disk": {"path": "/elsewhere/disk"}})
    moved = base.with_dir(tmp_path)
    assert moved.dir == tmp_path and moved.chunk_size == 64
    assert moved.disk_path == tmp_path / "disk"  # an absolute path named another store
    relative = StoreConfig.from_dict({"disk": {"path": "ssd"}}).with_dir(tmp_path)
    assert relative.disk_path == tmp_path / "ssd"


def test_connector_options_override_the_loaded_config() -> None:
    """An engine's connector options (vLLM's kv_connector_extra_config) are nested tables or
    dotted keys over the file/env config; a typo is refused with the nearest key."""
    base = KVCacheConfig.from_dict({"store": {"chunk_size": 512}})
    cfg = base.with_overrides({"store.cpu.capacity": "8GiB",
                               "connector": {"server": "unix:///run/kvcache.sock"}})
    assert cfg.store.cpu.capacity == 8 << 30 and cfg.store.chunk_size == 512
    assert cfg.connector.server == "unix:///run/kvcache.sock" and base.connector.server is None
    with pytest.raises(ConfigError, match=r"'store.cpu.capacty'.*did you mean 'capacity'"):
        base.with_overrides({"store.cpu.capacty": "1GiB"})
    with pytest.raises(ConfigError, match=r"store.chunk_size is a value"):
        base.with_overrides({"store.chunk_size.x": 1})
    with pytest.raises(ConfigError, match=r"connector.server: 'redis://h' is not a daemon URL"):
        base.with_overrides({"connector.server": "redis://h"})
    with pytest.raises(ConfigError, match=r"connector.load_timeout"):
        base.with_overrides({"connector": {"load_timeout": "0s"}})
