"""The reference model's corpus: the Python standard library's own ``.py`` and ``.txt`` files.

It exists on every machine that has Python, needs no download, and is code — which repeats
identifiers, lines and whole blocks, the structure KV reuse and codecs must preserve.

Files are listed in sorted order of their path relative to the stdlib root and split into
train and held-out by a hash of that *path* (not of the contents), so a file stays on the
same side of the split on every Python version; only the contents (and so the corpus hash)
change between Python releases. ``test``/``tests`` packages, ``site-packages`` and caches are
left out: distributions package them separately, so they are not on every machine.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".py", ".txt")
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
# 1 in HELDOUT_MODULUS files (by path hash) is held out.
HELDOUT_MODULUS = 20
# Files larger than this are skipped: a few generated tables would dominate the corpus.
MAX_FILE_BYTES = 256 * 1024


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_heldout(rel: str) -> bool:
    digest = hashlib.blake2b(rel.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELDOUT_MODULUS == 0


@dataclass(frozen=True)
class CorpusFile:
    rel: str  # path relative to the stdlib root, '/'-separated
    path: Path


@dataclass(frozen=True)
class Corpus:
    """The sorted train and held-out file lists under ``root``."""

    root: Path
    train: tuple[CorpusFile, ...]
    heldout: tuple[CorpusFile, ...]

    def read(self, f: CorpusFile) -> bytes:
        return f.path.read_bytes()

    def split_hash(self, split: str) -> str:
        """blake2b over the relative paths and contents of one split's files, in order."""
        files = self.train if split == "train" else self.heldout
        return _files_hash(files)

    def describe(self) -> dict[str, object]:
        def size(files: Sequence[CorpusFile]) -> int:
            return sum(f.path.stat().st_size for f in files)

        return {
            # the interpreter, not its install path: a log names no machine's folders
            "source": "Python standard library (sysconfig stdlib path) of "
                      f"{platform.python_implementation()} {platform.python_version()}",
            "suffixes": list(SUFFIXES),
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "max_file_bytes": MAX_FILE_BYTES,
            "split": f"held-out iff blake2b-64(relative path) % {HELDOUT_MODULUS} == 0",
            "train_files": len(self.train),
            "train_bytes": size(self.train),
            "train_hash": self.split_hash("train"),
            "heldout_files": len(self.heldout),
            "heldout_bytes": size(self.heldout),
            "heldout_hash": self.split_hash("heldout"),
        }


def _files_hash(files: Sequence[CorpusFile]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update(f.rel.encode() + b"\0")
        h.update(f.path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def load_corpus(root: Path | None = None) -> Corpus:
    """List the corpus files under ``root`` (default: this interpreter's stdlib)."""
    root = stdlib_root() if root is None else Path(root)
    train: list[CorpusFile] = []
    heldout: list[CorpusFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune excluded packages instead of walking them (the test suite is most files).
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix not in SUFFIXES or not path.is_file():
                continue
            size = path.stat().st_size
            if size == 0 or size > MAX_FILE_BYTES:
                continue
            rel = path.relative_to(root).as_posix()
            (heldout if _is_heldout(rel) else train).append(CorpusFile(rel, path))
    # os.walk order depends on the file system; sort by the relative path string.
    train.sort(key=lambda f: f.rel)
    heldout.sort(key=lambda f: f.rel)
    return Corpus(root=root, train=tuple(train), heldout=tuple(heldout))
