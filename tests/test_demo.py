"""``kvcache demo`` runs quickly, reuses KV, matches a full prefill, and persists."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvcache.tools import demo
from kvcache.tools.demo import format_table, run_demo

# float32 model; reuse only reorders the same arithmetic (observed ~1e-6).
MAX_LOGIT_DIFF = 1e-4


@pytest.mark.slow
def test_run_demo_reuses_and_second_run_hits_disk(tmp_path: Path):
    first = run_demo(tmp_path, requests=2)
    for key in (
        "ttft_cold_s",
        "ttft_warm_s",
        "reused_tokens",
        "max_abs_logit_diff",
        "hits_by_tier",
        "requests",
    ):
        assert key in first
    assert first["reused_tokens"] > 0  # the chat round reuses the system prompt
    assert first["max_abs_logit_diff"] < MAX_LOGIT_DIFF
    assert first["ttft_cold_s"] > 0 and first["ttft_warm_s"] > 0
    assert "full prefill" in format_table(first)

    # A fresh store object on the same directory starts with an empty CPU tier.
    second = run_demo(tmp_path, requests=2)
    assert second["hits_by_tier"].get("disk", 0) > 0
    assert second["reused_tokens"] > first["reused_tokens"]
    assert second["max_abs_logit_diff"] < MAX_LOGIT_DIFF


@pytest.mark.slow
def test_blend_demo_reuses_documents_in_other_orders_and_reports_misses(tmp_path: Path,
                                                                         capsys):
    from kvcache.tools.cli import main as cli_main

    assert cli_main(["demo", "--blend", "--store", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["requests"]
    assert rows[0]["reused_tokens"] == 0  # nothing stored yet
    assert rows[-1]["reused_tokens"] > 0 and rows[-1]["hits_by_tier"]
    assert result["missed_tokens"]["not stored"] > 0
    for r in rows:
        assert r["reused_tokens"] + r["recomputed_tokens"] + r["computed_tokens"] \
            == r["prompt_tokens"]
        assert r["kl"] >= 0
    assert cli_main(["demo", "--blend", "--store", str(tmp_path)]) == 0
    assert "documents reused" in capsys.readouterr().out


def test_main_passes_cli_arguments_and_prints_json(tmp_path: Path, capsys, monkeypatch):
    seen = {}

    def fake_run_demo(store_dir, **kw):
        seen.update(store_dir=store_dir, **kw)
        return {"store_dir": str(store_dir), "reused_tokens": 1}

    # The real workload runs above; here only the CLI wiring is under test.
    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    args = argparse.Namespace(store=str(tmp_path), json=True, config=None)
    assert demo.main(args) == 0
    assert json.loads(capsys.readouterr().out) == {"store_dir": str(tmp_path), "reused_tokens": 1}
    assert seen["store_dir"] == tmp_path and seen["requests"] == demo.DEFAULT_REQUESTS


# A fresh interpreter where triton cannot be imported, as on a CPU machine installed without
# the test extra; deprecation warnings are errors while the demo runs.
_WITHOUT_TRITON = textwrap.dedent(
    """
    import importlib, pkgutil, sys, warnings
    from pathlib import Path

    sys.modules["triton"] = None  # as if not installed: "import triton" raises ImportError

    import torch

    for name in ("kvstore", "codecs", "kernels", "connectors", "tools"):
        pkg = importlib.import_module("kvcache." + name)
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if "._triton" in mod.name:  # the @triton.jit modules themselves
                continue
            try:
                importlib.import_module(mod.name)
            except ModuleNotFoundError as e:
                # an engine's adapter needs that engine (its own venv in CI), nothing else
                if (mod.name, e.name) not in (("kvcache.connectors.vllm", "vllm"),
                                              ("kvcache.connectors.sglang", "sglang")):
                    raise

    from kvcache.kernels.dispatch import use_triton

    assert not use_triton("auto", torch.device("cuda"))  # the torch reference instead

    from kvcache.tools.demo import run_demo

    warnings.simplefilter("error", FutureWarning)
    warnings.simplefilter("error", DeprecationWarning)
    result = run_demo(Path(sys.argv[1]), requests=2)
    assert result["reused_tokens"] > 0, result
    assert result["max_abs_logit_diff"] < 1e-4, result
    """
)


@pytest.mark.slow
def test_demo_runs_without_triton_and_without_deprecation_warnings(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRITON, str(tmp_path)],
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    # transformers also reports deprecated arguments through its logger, on stderr
    assert "deprecated" not in out.stderr.lower(), out.stderr
