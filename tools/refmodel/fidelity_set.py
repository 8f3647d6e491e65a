"""The codecs' fidelity set: served windows of text the reference model never saw.

The reference model was trained on the CPython standard library (``corpus.py``), and
figures taken on its held-out files flatter a codec tuned there. Codec fidelity is
measured on three other domains instead, all shipped inside packages kvcache itself
depends on, so every machine that installs kvcache has them (no download):

- ``code``: Python modules of third-party packages (aiohttp, PyYAML, transformers, torch,
  numpy, safetensors, msgpack);
- ``docs``: English documentation prose: the long string constants (docstrings, and the
  texts torch and numpy attach with ``add_docstr``/``add_newdoc``) of documentation-heavy
  modules of torch, numpy and transformers, ``MIN_DOC_CHARS`` characters or more, each
  dedented, in source order, separated by a blank line. Their reST/markdown markup and
  short examples come with them;
- ``cpp``: C/C++ headers shipped with torch (``torch/include``) and numpy.

``MANIFEST`` lists every file by package-relative path and puts it in the ``tune`` split
(where codec defaults are chosen) or the ``eval`` split (where they are reported): the
splits share no source file. A listed file that is missing raises
``FidelitySetUnavailableError`` naming it — the set never changes silently. Contents do
change with package versions: ``FidelitySet.set_hash`` (over each file's path and the
exact bytes windows are cut from, and the window parameters) names the set a figure was
measured on, and ``describe()`` records the packages' versions.

Each file gives ``WINDOWS_PER_FILE`` windows at evenly spread line starts: ``<bos>`` then
``CONTEXT - 1`` bytes — ``CONTEXT // CHUNK_TOKENS`` chunks of ``CHUNK_TOKENS`` tokens, as
the store keeps a prompt's KV — then ``CONTINUATION`` bytes on which predictions are
scored.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcache.kvstore.errors import KVCacheError
from kvcache.tools.refmodel.tokenizer import BOS_ID

DOMAINS = ("code", "docs", "cpp")
SPLITS = ("eval", "tune")
CHUNK_TOKENS = 256
CONTEXT = 4 * CHUNK_TOKENS
CONTINUATION = 64
WINDOWS_PER_FILE = 2
MIN_DOC_CHARS = 200
QUICK_WINDOWS_PER_DOMAIN = 1

# domain -> split -> package-relative paths (first component: the importable package).
# Chosen by hand so that no file of one split is a near copy of one of the other
# (transformers' modeling files are largely generated from each other: only one is used).
MANIFEST: dict[str, dict[str, tuple[str, ...]]] = {
    "code": {
        "eval": (
            "aiohttp/client.py",
            "aiohttp/web_request.py",
            "aiohttp/http_parser.py",
            "aiohttp/cookiejar.py",
            "yaml/constructor.py",
            "yaml/scanner.py",
            "transformers/models/llama/modeling_llama.py",
            "transformers/cache_utils.py",
            "torch/serialization.py",
            "torch/utils/data/dataloader.py",
            "numpy/lib/_npyio_impl.py",
            "safetensors/torch.py",
        ),
        "tune": (
            "aiohttp/connector.py",
            "aiohttp/multipart.py",
            "yaml/emitter.py",
            "transformers/configuration_utils.py",
            "torch/optim/lr_scheduler.py",
            "torch/fx/graph.py",
            "numpy/polynomial/_polybase.py",
            "msgpack/fallback.py",
        ),
    },
    "docs": {
        "eval": (
            "torch/_tensor_docs.py",
            "torch/nn/modules/loss.py",
            "torch/nn/modules/activation.py",
            "torch/nn/modules/rnn.py",
            "torch/functional.py",
            "torch/fft/__init__.py",
            "numpy/_core/_add_newdocs.py",
            "numpy/_core/fromnumeric.py",
            "numpy/linalg/_linalg.py",
            "numpy/lib/_nanfunctions_impl.py",
            "transformers/training_args.py",
            "transformers/generation/configuration_utils.py",
        ),
        "tune": (
            "torch/_torch_docs.py",
            "torch/nn/modules/conv.py",
            "torch/linalg/__init__.py",
            "torch/nn/modules/pooling.py",
            "numpy/lib/_function_base_impl.py",
            "numpy/_core/numeric.py",
            "transformers/generation/logits_process.py",
            "transformers/tokenization_utils_base.py",
        ),
    },
    "cpp": {
        "eval": (
            "torch/include/c10/util/Exception.h",
            "torch/include/c10/util/SmallVector.h",
            "torch/include/c10/util/intrusive_ptr.h",
            "torch/include/c10/util/typeid.h",
            "torch/include/c10/core/TensorImpl.h",
            "torch/include/c10/core/DispatchKeySet.h",
            "torch/include/ATen/core/ivalue.h",
            "torch/include/ATen/core/jit_type.h",
            "torch/include/ATen/core/function_schema.h",
            "torch/include/ATen/TensorIterator.h",
            "numpy/_core/include/numpy/ndarraytypes.h",
            "numpy/_core/include/numpy/npy_common.h",
        ),
        "tune": (
            "torch/include/c10/util/flat_hash_map.h",
            "torch/include/c10/util/strong_type.h",
            "torch/include/c10/core/TensorOptions.h",
            "torch/include/c10/core/SymInt.h",
            "torch/include/ATen/core/IListRef.h",
            "torch/include/ATen/autocast_mode.h",
            "numpy/_core/include/numpy/dtype_api.h",
            "numpy/_core/include/numpy/npy_math.h",
        ),
    },
}


class FidelitySetUnavailableError(KVCacheError, FileNotFoundError):
    """A file of the fidelity set is not on this machine (or too short to cut windows)."""


@dataclass(frozen=True)
class Window:
    """One served window: ``context`` (``CONTEXT`` token ids, ``<bos>`` first) is stored as
    ``CHUNK_TOKENS``-token chunks; ``continuation`` (``CONTINUATION`` ids) is scored."""

    domain: str
    source: str  # "<package-relative path>@<byte offset>"
    context: tuple[int, ...]
    continuation: tuple[int, ...]

    def chunk_starts(self) -> list[int]:
        return list(range(0, len(self.context), CHUNK_TOKENS))

    def context_tensor(self) -> torch.Tensor:
        """``[CONTEXT]`` int64."""
        return torch.tensor(self.context, dtype=torch.long)

    def continuation_tensor(self) -> torch.Tensor:
        """``[CONTINUATION]`` int64."""
        return torch.tensor(self.continuation, dtype=torch.long)


@dataclass(frozen=True)
class SourceFile:
    domain: str
    path: str  # package-relative, '/'-separated
    text_bytes: int  # length of the text windows are cut from
    digest: str  # blake2b-128 of that text


@dataclass(frozen=True)
class FidelitySet:
    split: str
    quick: bool
    files: tuple[SourceFile, ...]
    windows: tuple[Window, ...]
    packages: dict[str, str]  # importable package -> installed distribution version

    @property
    def set_hash(self) -> str:
        """blake2b-64 over the window parameters and each file's path and text digest."""
        h = hashlib.blake2b(digest_size=8)
        h.update(json.dumps([self.split, self.quick, CONTEXT, CHUNK_TOKENS, CONTINUATION,
                             WINDOWS_PER_FILE, MIN_DOC_CHARS]).encode())
        for f in self.files:
            h.update(f"{f.domain}\0{f.path}\0{f.digest}\0".encode())
        return h.hexdigest()

    def describe(self) -> dict[str, object]:
        by_domain = {d: sum(w.domain == d for w in self.windows) for d in DOMAINS}
        return {
            "split": self.split,
            "quick": self.quick,
            "set_hash": self.set_hash,
            "windows": len(self.windows),
            "windows_by_domain": by_domain,
            "files_by_domain": {d: sum(f.domain == d for f in self.files) for d in DOMAINS},
            "window": f"<bos> + {CONTEXT - 1} bytes as {CONTEXT // CHUNK_TOKENS} chunks of "
                      f"{CHUNK_TOKENS} tokens, then {CONTINUATION} bytes scored",
            "packages": dict(sorted(self.packages.items())),
            "files": [f"{f.domain}:{f.path} ({f.text_bytes} B, {f.digest[:12]})"
                      for f in self.files],
        }


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_version(package: str) -> str:
    dists = importlib.metadata.packages_distributions().get(package, [])
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "?"


def doc_text(source: str) -> bytes:
    """The ``docs`` text of a Python module's ``source``: every string constant of at least
    ``MIN_DOC_CHARS`` characters, dedented (``inspect.cleandoc``), in source order, joined
    by a blank line; UTF-8."""
    found = [
        (node.lineno, node.col_offset, inspect.cleandoc(node.value))
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and len(node.value) >= MIN_DOC_CHARS
    ]
    return "\n\n".join(text for *_, text in sorted(found)).encode("utf-8")


def _line_start(data: bytes, pos: int) -> int:
    """The start of the first line at or after ``pos``."""
    if pos == 0:
        return 0
    nl = data.find(b"\n", pos - 1)
    return pos if nl < 0 else nl + 1


def cut_windows(domain: str, path: str, text: bytes, count: int) -> list[Window]:
    """``count`` windows of ``text`` at evenly spread line starts (see the module
    docstring); they do not overlap when the text holds ``count`` of them."""
    span = CONTEXT - 1 + CONTINUATION
    room = len(text) - span
    if room < 0:
        raise FidelitySetUnavailableError(
            f"fidelity set file {path} has {len(text)} bytes of text, fewer than one "
            f"window ({span}); this package version differs from the one the set was "
            "made for: use the versions in docs/benchmarks.md or pick another file"
        )
    out = []
    for i in range(count):
        start = min(_line_start(text, room * (2 * i + 1) // (2 * count)), room)
        body = text[start : start + span]
        out.append(Window(
            domain=domain,
            source=f"{path}@{start}",
            context=(BOS_ID, *body[: CONTEXT - 1]),
            continuation=tuple(body[CONTEXT - 1 :]),
        ))
    return out


def manifest_paths(split: str) -> list[tuple[str, str]]:
    """``(domain, path)`` of every file of ``split``, in manifest order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [(d, p) for d in DOMAINS for p in MANIFEST[d][split]]


def load_fidelity_set(split: str = "eval", *, quick: bool = False) -> FidelitySet:
    """The windows of ``split`` (``"eval"`` or ``"tune"``). ``quick``: the first file of
    each domain, ``QUICK_WINDOWS_PER_DOMAIN`` window(s) each. Raises
    ``FidelitySetUnavailableError`` listing every missing file."""
    entries = manifest_paths(split)
    if quick:
        entries = [next(e for e in entries if e[0] == d) for d in DOMAINS]
    roots: dict[str, Path | None] = {}
    missing: list[str] = []
    texts: list[tuple[str, str, bytes]] = []
    for domain, path in entries:
        package, _, rel = path.partition("/")
        if package not in roots:
            roots[package] = _package_dir(package)
        root = roots[package]
        file = None if root is None else root / rel
        if file is None or not file.is_file():
            missing.append(path)
            continue
        data = file.read_bytes()
        if domain == "docs":
            data = doc_text(data.decode("utf-8"))
        texts.append((domain, path, data))
    if missing:
        raise FidelitySetUnavailableError(
            f"the {split} fidelity set needs {len(missing)} file(s) this machine lacks: "
            f"{', '.join(missing)}. They ship with kvcache's dependencies; a different "
            "version of a package may have moved them (the set was made with the versions "
            "in docs/benchmarks.md). Figures on another set would not be comparable, so "
            "none are made."
        )
    per_file = QUICK_WINDOWS_PER_DOMAIN if quick else WINDOWS_PER_FILE
    windows: list[Window] = []
    files: list[SourceFile] = []
    for domain, path, data in texts:
        windows += cut_windows(domain, path, data, per_file)
        files.append(SourceFile(domain, path, len(data),
                                hashlib.blake2b(data, digest_size=16).hexdigest()))
    packages = {p: _package_version(p) for p in sorted(roots)}
    return FidelitySet(split=split, quick=quick, files=tuple(files), windows=tuple(windows),
                       packages=packages)
