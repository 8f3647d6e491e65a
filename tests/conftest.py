"""Shared fixtures. TRITON_INTERPRET must be set before any @triton.jit decorator runs."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from kvcache.kvstore.layout import KVLayout


@pytest.fixture
def layout() -> KVLayout:
    return KVLayout("test-model", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")


@pytest.fixture(autouse=True)
def _isolated_store_dir(tmp_path, monkeypatch):
    """No test may touch the user's real ~/.cache/kvcache."""
    monkeypatch.setenv("KVCACHE_DIR", str(tmp_path / "default-store"))
