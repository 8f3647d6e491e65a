"""Validation of untrusted codec input: every decoder checks names, dtypes, shapes and
parameters through these helpers before touching data, so hostile or foreign objects
raise ``CorruptObjectError`` instead of indexing out of bounds or allocating wildly."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kvcache.kvstore.errors import CorruptObjectError, LayoutMismatchError
from kvcache.kvstore.layout import KVLayout


def tensor(
    tensors: Mapping[str, torch.Tensor],
    name: str,
    dtype: torch.dtype,
    shape: Sequence[int],
    codec: str,
) -> torch.Tensor:
    """``tensors[name]``, checked to be exactly ``shape`` of ``dtype``."""
    t = tensors.get(name)
    if not isinstance(t, torch.Tensor):
        raise CorruptObjectError(f"{codec} object lacks tensor {name!r}")
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise CorruptObjectError(
            f"{codec} tensor {name!r} is {tuple(t.shape)} {t.dtype}, "
            f"expected {tuple(shape)} {dtype}"
        )
    return t


def version(params: Mapping[str, Any], codec: str, supported: int | Sequence[int]) -> int:
    """The object's format version, checked to be one this build reads."""
    readable = (supported,) if isinstance(supported, int) else tuple(supported)
    got = params.get("version")
    if isinstance(got, bool) or got not in readable:
        raise CorruptObjectError(
            f"{codec} object has format version {got!r}; this build reads "
            f"{' or '.join(map(str, readable))}"
        )
    return int(got)


def int_param(
    params: Mapping[str, Any], key: str, codec: str, choices: Sequence[int] | None = None,
    lo: int = 0, hi: int = 1 << 20,
) -> int:
    v = params.get(key)
    # bool is an int subclass; a stored true/false is never a valid count.
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CorruptObjectError(f"{codec} param {key!r}={v!r} is not an int in [{lo}, {hi}]")
    if choices is not None and v not in choices:
        raise CorruptObjectError(f"{codec} param {key!r}={v!r} not one of {list(choices)}")
    return v


def bool_param(params: Mapping[str, Any], key: str, codec: str) -> bool:
    v = params.get(key)
    if not isinstance(v, bool):
        raise CorruptObjectError(f"{codec} param {key!r}={v!r} is not a bool")
    return v


def float_list(params: Mapping[str, Any], key: str, n: int, codec: str) -> list[float]:
    """A list of ``n`` finite positive floats."""
    v = params.get(key)
    if (
        not isinstance(v, list)
        or len(v) != n
        or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
            for x in v
        )
    ):
        raise CorruptObjectError(f"{codec} param {key!r} is not {n} finite positive numbers")
    return [float(x) for x in v]


def int_list(
    params: Mapping[str, Any], key: str, n: int, codec: str, choices: Sequence[int]
) -> list[int]:
    v = params.get(key)
    if not isinstance(v, list) or len(v) != n or not all(
        isinstance(x, int) and not isinstance(x, bool) and x in choices for x in v
    ):
        raise CorruptObjectError(f"{codec} param {key!r} is not {n} values in {list(choices)}")
    return list(v)


def offsets(t: torch.Tensor, n: int, total: int, codec: str, name: str) -> list[int]:
    """An int64 offsets tensor ``[n + 1]``: starts at 0, non-decreasing, ends at ``total``."""
    if t.dtype != torch.int64 or tuple(t.shape) != (n + 1,):
        raise CorruptObjectError(f"{codec} tensor {name!r} is not int64 [{n + 1}]")
    out = [int(x) for x in t.tolist()]
    if out[0] != 0 or out[-1] != total or any(b < a for a, b in itertools.pairwise(out)):
        raise CorruptObjectError(f"{codec} tensor {name!r} holds inconsistent offsets")
    return out


def check_chunk(chunk: torch.Tensor, layout: KVLayout, codec: str, *, mla_ok: bool) -> int:
    """Validate an input chunk; returns its token count."""
    if layout.is_mla and not mla_ok:
        raise LayoutMismatchError(
            f"codec {codec!r} handles K/V layouts only; store MLA latents with 'raw' or 'zstd'"
        )
    if chunk.dim() != len(layout.chunk_shape(1)):
        raise LayoutMismatchError(
            f"chunk has {chunk.dim()} dims, layout wants {layout.chunk_shape(1)}"
        )
    tokens = int(chunk.shape[layout.token_dim])
    if tuple(chunk.shape) != layout.chunk_shape(tokens) or chunk.dtype != layout.torch_dtype:
        raise LayoutMismatchError(
            f"chunk {tuple(chunk.shape)} {chunk.dtype} does not match layout "
            f"{layout.chunk_shape(tokens)} {layout.dtype}"
        )
    return tokens
