"""The codecs' fidelity set (tools/refmodel/fidelity_set.py): text the reference model was
not trained on, cut into served windows, with disjoint tuning and evaluation splits."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
from pathlib import Path

import pytest

from kvcache.kvstore.errors import KVCacheError
from kvcache.tools.refmodel import fidelity_set as fs
from kvcache.tools.refmodel.corpus import load_corpus
from kvcache.tools.refmodel.tokenizer import BOS_ID


def test_splits_share_no_file_and_hold_enough_per_domain():
    for domain in fs.DOMAINS:
        ev, tu = fs.MANIFEST[domain]["eval"], fs.MANIFEST[domain]["tune"]
        assert len(ev) >= 8 and len(tu) >= 8, domain
        assert len(set(ev)) == len(ev) and len(set(tu)) == len(tu)
    everything = [p for d in fs.DOMAINS for s in fs.SPLITS for p in fs.MANIFEST[d][s]]
    # no file in two splits, nor in two domains
    assert len(set(everything)) == len(everything)
    assert fs.WINDOWS_PER_FILE * sum(len(fs.MANIFEST[d]["eval"]) for d in fs.DOMAINS) >= 64


def test_every_file_ships_with_a_hard_dependency():
    # the set must exist wherever kvcache installs: only packages it depends on without
    # extras (triton, for one, comes only with the test extra or CUDA torch)
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    hard = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() for d in deps}
    dists = importlib.metadata.packages_distributions()
    for _, path in fs.manifest_paths("eval") + fs.manifest_paths("tune"):
        package = path.partition("/")[0]
        assert {d.lower() for d in dists.get(package, [])} & hard, path


def test_no_file_comes_from_the_training_corpus():
    # the reference model was trained on the standard library: no file of the set may be
    # one of its files (third-party packages live outside it)
    stdlib = load_corpus().root.resolve()
    for _, path in fs.manifest_paths("eval") + fs.manifest_paths("tune"):
        package, _, rel = path.partition("/")
        root = fs._package_dir(package)
        assert root is not None, path
        assert not (root / rel).resolve().is_relative_to(stdlib), path


def test_windows_are_served_chunks_and_deterministic():
    a = fs.load_fidelity_set("eval", quick=True)
    b = fs.load_fidelity_set("eval", quick=True)
    assert a.windows == b.windows and a.set_hash == b.set_hash
    assert [w.domain for w in a.windows] == list(fs.DOMAINS)
    for w in a.windows:
        assert len(w.context) == fs.CONTEXT == 4 * fs.CHUNK_TOKENS == 1024
        assert w.chunk_starts() == [0, 256, 512, 768]
        assert w.context[0] == BOS_ID and all(t < 256 for t in w.context[1:])
        assert len(w.continuation) == fs.CONTINUATION
        assert w.context_tensor().shape == (1024,)
    # the tuning split is another set of windows, from other files
    t = fs.load_fidelity_set("tune", quick=True)
    assert t.set_hash != a.set_hash
    assert not {w.source.split("@")[0] for w in t.windows} & {
        w.source.split("@")[0] for w in a.windows
    }


def test_hash_names_the_contents():
    a = fs.load_fidelity_set("eval", quick=True)
    f0 = a.files[0]
    changed = dataclasses.replace(a, files=(dataclasses.replace(f0, digest="0" * 32),
                                            *a.files[1:]))
    assert changed.set_hash != a.set_hash
    d = a.describe()
    assert d["set_hash"] == a.set_hash and d["windows"] == 3
    assert set(d["packages"]) == {f.path.split("/")[0] for f in a.files}


def test_missing_file_is_named_not_skipped(monkeypatch):
    manifest = {d: dict(s) for d, s in fs.MANIFEST.items()}
    manifest["code"]["eval"] = ("aiohttp/no_such_module.py", *manifest["code"]["eval"])
    monkeypatch.setattr(fs, "MANIFEST", manifest)
    with pytest.raises(fs.FidelitySetUnavailableError, match=r"aiohttp/no_such_module\.py") as e:
        fs.load_fidelity_set("eval", quick=True)
    assert isinstance(e.value, KVCacheError)
    with pytest.raises(ValueError, match="split"):
        fs.load_fidelity_set("train")


def test_cut_windows_starts_at_lines_and_refuses_short_text():
    text = b"".join(b"line %04d of some text\n" % i for i in range(400))
    ws = fs.cut_windows("code", "pkg/x.py", text, 2)
    assert len(ws) == 2
    starts = [int(w.source.split("@")[1]) for w in ws]
    span = fs.CONTEXT - 1 + fs.CONTINUATION
    assert starts[0] + span <= starts[1]  # no overlap
    for s, w in zip(starts, ws, strict=True):
        assert text[s - 1 : s] == b"\n"
        assert bytes(w.context[1:]) + bytes(w.continuation) == text[s : s + span]
    with pytest.raises(fs.FidelitySetUnavailableError, match="fewer than one window"):
        fs.cut_windows("code", "pkg/x.py", text[:500], 1)


def test_doc_text_keeps_long_strings_in_source_order():
    long_a = "A" * fs.MIN_DOC_CHARS
    long_b = "first line\n    indented " + "b" * fs.MIN_DOC_CHARS
    src = (
        f'def f():\n    """{long_b}"""\n    x = "short"\n\n'
        f'add_docstr(f, """{long_a}""")\n'
    )
    out = fs.doc_text(src).decode()
    assert out == "first line\nindented " + "b" * fs.MIN_DOC_CHARS + "\n\n" + long_a
    assert "short" not in out


@pytest.mark.slow
def test_full_splits_load_with_enough_windows():
    ev = fs.load_fidelity_set("eval")
    tu = fs.load_fidelity_set("tune")
    assert len(ev.windows) >= 64
    for d in fs.DOMAINS:
        assert sum(f.domain == d for f in ev.files) >= 8
        assert sum(w.domain == d for w in ev.windows) == fs.WINDOWS_PER_FILE * len(
            fs.MANIFEST[d]["eval"])
    assert not {f.path for f in ev.files} & {f.path for f in tu.files}
    assert len({w.source for w in ev.windows}) == len(ev.windows)
