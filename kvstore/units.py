"""Human sizes and durations: ``"8GiB"`` ⇄ 8589934592, ``"1h30m"`` ⇄ 5400.0 seconds.

Config files and command lines take these; everything inside the store works in int bytes
and float seconds. Decimal units (KB, MB, GB, TB) are powers of 1000 and binary units
(KiB … TiB) powers of 1024, as in IEC 80000-13, so "8GB" and "8GiB" differ on purpose.
Bad input raises ``ConfigError`` listing the accepted forms; callers that know the config
key prefix it to the message.
"""

from __future__ import annotations

import math
import re

from kvcache.kvstore.errors import ConfigError

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": TiB,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_HELP = (
    "use e.g. '8GiB' or 8589934592 (units: B; KB, MB, GB, TB = powers of 1000; "
    "KiB, MiB, GiB, TiB = powers of 1024)"
)

_DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
# One or more "<number><unit>" parts, so "1h30m" works; a bare number means seconds.
_DURATION_PART = r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d|w)"
_DURATION_RE = re.compile(rf"^(?:\s*{_DURATION_PART})+\s*$", re.IGNORECASE)
_DURATION_PART_RE = re.compile(_DURATION_PART, re.IGNORECASE)
_DURATION_HELP = (
    "use e.g. '90s', '30m', '1h', '1h30m', '2d', '1w' or a number of seconds "
    "(units: ms, s, m, h, d, w)"
)


MAX_SIZE = (1 << 63) - 1  # sizes end up in int64 fields (torch, LMDB, file offsets)


def parse_size(value: str | int | float) -> int:
    """Bytes in ``value``: an int, or a string such as ``"1.5GiB"``, ``"512 MB"``, ``"4096"``.

    A unit may take a fraction, rounded to the nearest byte ("1.1GiB" is not a whole
    number); a bare number of bytes may not ("1.5" bytes is a mistake, not 2 bytes).
    """
    # bool is an int subclass; True bytes is always a mistake in a config.
    if isinstance(value, bool):
        raise ConfigError(f"{value!r} is not a size; {_SIZE_HELP}")
    if isinstance(value, int):
        nbytes = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ConfigError(f"{value!r} is not a whole number of bytes; {_SIZE_HELP}")
        nbytes = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m is None or m.group(2).lower() not in _SIZE_UNITS:
            raise ConfigError(f"{value!r} is not a size; {_SIZE_HELP}")
        number, unit = m.group(1), m.group(2).lower()
        if _SIZE_UNITS[unit] == 1 and not number.isdigit():
            raise ConfigError(
                f"{value!r} is not a whole number of bytes; give a unit for fractions "
                f"(e.g. '1.5GiB'); {_SIZE_HELP}"
            )
        nbytes = round(float(number) * _SIZE_UNITS[unit]) if not number.isdigit() \
            else int(number) * _SIZE_UNITS[unit]
    else:
        raise ConfigError(f"{value!r} is not a size; {_SIZE_HELP}")
    if nbytes < 0:
        raise ConfigError(f"{value!r} is negative; sizes are >= 0")
    if nbytes > MAX_SIZE:
        raise ConfigError(f"{value!r} is larger than any store can be (at most 8 EiB)")
    return nbytes


def format_size(nbytes: int) -> str:
    """``nbytes`` in binary units for people: ``"512 B"``, ``"1.5 GiB"``, ``"4 GiB"``."""
    sign = "-" if nbytes < 0 else ""
    n = abs(nbytes)
    if n < KiB:
        return f"{sign}{n} B"
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            text = f"{n / scale:.2f}".rstrip("0").rstrip(".")
            return f"{sign}{text} {unit}"
    raise AssertionError("unreachable")


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value``: a number of seconds, or ``"90s"``, ``"30m"``, ``"1h30m"``, ``"2d"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{value!r} is not a duration; {_DURATION_HELP}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            if not _DURATION_RE.match(text):
                raise ConfigError(f"{value!r} is not a duration; {_DURATION_HELP}") from None
            seconds = sum(
                float(num) * _DURATION_UNITS[unit.lower()]
                for num, unit in _DURATION_PART_RE.findall(text)
            )
    else:
        raise ConfigError(f"{value!r} is not a duration; {_DURATION_HELP}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"{value!r} is not a finite, non-negative duration; {_DURATION_HELP}")
    return seconds


def format_duration(seconds: float) -> str:
    """``seconds`` for people, in a form ``parse_duration`` reads back: ``"1h30m"``, ``"2.5s"``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 60:
        if 0 < seconds < 1:
            return f"{round(seconds * 1000):d}ms"
        return f"{seconds:.3g}s" if seconds != int(seconds) else f"{int(seconds)}s"
    rest = round(seconds)
    parts: list[str] = []
    for unit, scale in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, scale)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
