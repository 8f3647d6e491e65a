"""``kvcache serve`` as a child process, for the benchmarks that measure against it."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvcache.kvstore.errors import KVCacheError


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 20 s; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def serve_process(workdir: Path, capacity: int) -> Iterator[tuple[int, str, str]]:
    """``kvcache serve`` (CPU tier of ``capacity`` bytes only; the caller's ``KVCACHE_*``
    settings ignored) on a free loopback port and a Unix socket under ``workdir``:
    (pid, TCP URL, Unix URL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_")}
    env |= {"KVCACHE_DISK_ENABLED": "false", "KVCACHE_CPU_CAPACITY": str(capacity),
            "KVCACHE_LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "kvcache.tools.cli", "serve", "--store",
           str(workdir / "store"), "--port", "0", "--socket", str(workdir / "daemon.sock")]
    with open(workdir / "daemon.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        tcp, unix = re.search(r"http://\S+", line), re.search(r"unix://\S+", line)
        if tcp is None or unix is None:
            raise KVCacheError(f"kvcache serve did not start: {line!r} "
                               f"{(workdir / 'daemon.log').read_text()[-2000:]}")
        yield proc.pid, tcp.group(0), unix.group(0)
    finally:
        stop_process(proc)
