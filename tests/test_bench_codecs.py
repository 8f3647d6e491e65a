"""``kvcache bench codecs``: where LMCache's interpreter comes from, its runner, and the
shape of the result (fidelity on the evaluation split with intervals, with and without the
copy circuit's hand-set planes)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

import kvcache.tools
from kvcache.kvstore.config import ENV_LMCACHE_PYTHON
from kvcache.kvstore.layout import KVLayout
from kvcache.tools import bench_codecs
from kvcache.tools.synthetic_kv import synthetic_kv

LAYOUT = KVLayout("bench-test", num_layers=4, num_kv_heads=2, head_dim=64, dtype="bfloat16")


def test_lmcache_python_option_beats_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_LMCACHE_PYTHON, raising=False)
    assert bench_codecs.lmcache_python() is None
    monkeypatch.setenv(ENV_LMCACHE_PYTHON, str(tmp_path / "env-python"))
    assert bench_codecs.lmcache_python() == tmp_path / "env-python"
    assert bench_codecs.lmcache_python(tmp_path / "opt-python") == tmp_path / "opt-python"


def test_lmcache_side_by_side_skips_with_a_note_saying_how(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_LMCACHE_PYTHON, raising=False)
    notes: list[str] = []
    assert bench_codecs._lmcache([], None, LAYOUT, notes) is None
    assert len(notes) == 1 and "--lmcache-python" in notes[0]
    assert "tools/lmcache_venv.sh" in notes[0]
    notes.clear()
    missing = tmp_path / "no-such-python"
    assert bench_codecs._lmcache([], None, LAYOUT, notes, missing) is None
    assert len(notes) == 1 and str(missing) in notes[0] and "skipped" in notes[0]


def _lmcache_or_skip() -> Path:
    python = bench_codecs.lmcache_python()
    if python is None or not python.exists():
        pytest.skip(f"no LMCache venv (comparison only; set {ENV_LMCACHE_PYTHON})")
    return python


def test_lmcache_runner_roundtrip(tmp_path):
    from safetensors.torch import load_file, save_file

    python = _lmcache_or_skip()
    chunks = {f"chunk{i}": synthetic_kv(LAYOUT, 32, seed=i) for i in range(2)}
    save_file(chunks, str(tmp_path / "in.st"))
    runner = Path(kvcache.tools.__file__).with_name("lmcache_cachegen_runner.py")
    proc = subprocess.run([str(python), str(runner), str(tmp_path), "--repeat", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((tmp_path / "out.json").read_text())
    out = load_file(str(tmp_path / "out.st"))
    assert info["raw_bytes"] == sum(c.numel() * c.element_size() for c in chunks.values())
    # sizes count its per-(layer, channel) 16-bit CDFs (at 32 tokens they outweigh the KV)
    assert 0 < info["cdf_bytes"] < info["encoded_bytes"] <= info["serialized_bytes"]
    assert "0.5.6" in info["note"]
    for name, chunk in chunks.items():
        assert out[name].shape == chunk.shape and out[name].dtype == chunk.dtype
        err = (out[name].float() - chunk.float()).pow(2).sum() / chunk.float().pow(2).sum()
        assert float(err) < 0.1


@pytest.mark.slow
def test_quick_bench_reports_intervals_with_and_without_circuit_planes(monkeypatch):
    monkeypatch.delenv(ENV_LMCACHE_PYTHON, raising=False)
    torch.manual_seed(0)
    r = bench_codecs.run(quick=True)
    assert r["fidelity_set"]["split"] == "eval" and r["fidelity_set"]["windows"] == 3
    assert any("LMCache side-by-side skipped" in n for n in r["notes"])
    by = {rec["name"]: rec for rec in r["records"]}
    for rec in r["records"]:
        for fig in (rec, rec["excl_circuit"]):
            for key in ("next_token_kl", "top1_agreement", "loss_gap", "k_nmse", "v_nmse"):
                lo, hi = fig[f"{key}_ci90"]
                assert lo - 1e-12 <= fig[key] <= hi + 1e-12, (rec["name"], key)
        assert set(rec["by_domain"]["all_planes"]) == {"code", "docs", "cpp"}
        assert not any(k.startswith("_") for k in rec)
    # lossless codecs are perfect either way; keeping planes exact can only help raw-like KL
    assert by["raw"]["top1_agreement_ci90"] == [1.0, 1.0]
    assert by["zstd"]["excl_circuit"]["next_token_kl"] == 0.0
    # restoring the circuit's planes removes part of a lossy codec's error
    assert by["quant-int2"]["excl_circuit"]["next_token_kl"] < by["quant-int2"]["next_token_kl"]
    goals = r["goals"]
    assert {"cachegen_default", "quant_int4"} <= set(goals) and "vs_lmcache" not in goals
    assert any(row["figure"].startswith("top-1 agreement") for row in r["rows"])
