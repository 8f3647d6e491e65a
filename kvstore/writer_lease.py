"""Writer leases: which processes that write blob files into a disk tier are alive, and
removing the files that dead ones left behind (``sweep_orphans``).

A blob file is written under a temporary name, renamed, and only then referenced by a
committed index record. A process killed between those steps leaves a file nobody
references (an orphan); a live process between them owns a file nobody references *yet*.
To tell the two apart, every writable opener holds an exclusive ``flock`` on its own lease
file ``writers/<token>.lease`` for as long as it is open and puts its token in the name of
every blob file it writes (``index_format.new_record_id``). The kernel drops the lock when
the process dies, ``kill -9`` included, so an unreferenced file whose writer's lease is
unlocked (or gone) is an orphan that can be removed at once, by any opener.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from kvcache.kvstore.index_format import parse_blob_name

LEASE_SUFFIX = ".lease"
_STARTING_SUFFIX = ".starting"


class WriterLease:
    """This opener's token, held alive by an exclusive lock on its lease file."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.token = os.urandom(6).hex()
        self._path = root / f"{self.token}{LEASE_SUFFIX}"
        # Locked under a temporary name, then renamed: a sweeper never sees the lease
        # unlocked under its final name, so it cannot mistake a starting writer for a dead one.
        tmp = root / f"{self.token}{_STARTING_SUFFIX}"
        self._fd: int | None = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(tmp, self._path)
        except BaseException:
            os.close(self._fd)
            tmp.unlink(missing_ok=True)
            raise

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
            os.close(self._fd)
            self._fd = None


def writer_alive(root: Path, token: str) -> bool:
    """True while the writer that owns ``token`` holds its lease."""
    try:
        fd = os.open(root / f"{token}{LEASE_SUFFIX}", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's lock
    return False


def reap_dead_leases(root: Path) -> int:
    """Remove the lease files of writers that died; returns how many. Call it after their
    orphans are gone (a file whose writer has no lease file counts as dead anyway)."""
    n = 0
    if not root.is_dir():
        return 0
    for lease in root.iterdir():
        if not lease.name.endswith((LEASE_SUFFIX, _STARTING_SUFFIX)):
            continue
        try:
            fd = os.open(lease, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lease.unlink(missing_ok=True)  # unlinked while locked: nobody can adopt it
            n += 1
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
    return n


def sweep_orphans(
    blobs: Path,
    leases: Path,
    own: str | None,
    referenced: Callable[[], set[str]],
    min_age: float,
) -> int:
    """Remove the files under ``blobs`` (``<shard>/<name>``) that ``referenced()`` does not
    name and whose writer is dead; files that name no writer (made before tokens existed)
    only once older than ``min_age`` seconds. ``own``: this process's token (alive).
    Returns how many were removed."""
    alive: dict[str, bool] = {}
    candidates: list[tuple[str, Path, bool]] = []  # (rel, path, writer known dead)
    for shard in blobs.iterdir() if blobs.is_dir() else ():
        for f in shard.iterdir() if shard.is_dir() else ():
            parsed = parse_blob_name(f.name)
            writer = None if parsed is None else parsed[1]  # None: only its age tells
            if writer is not None and writer != own and writer not in alive:
                alive[writer] = writer_alive(leases, writer)
            dead = writer is not None and writer != own and not alive[writer]
            candidates.append((f"{shard.name}/{f.name}", f, dead))
    # The records are read *after* the writers were found dead: a dead writer cannot
    # commit any more, so everything it committed is in this snapshot.
    in_use = referenced()
    cutoff = time.time() - min_age
    n = 0
    for rel, f, dead in candidates:
        if rel in in_use:
            continue
        try:
            if dead or f.stat().st_mtime <= cutoff:
                f.unlink()
                n += 1
        except FileNotFoundError:
            pass  # another opener swept it
    reap_dead_leases(leases)
    return n
