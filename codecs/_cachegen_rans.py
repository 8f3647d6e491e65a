"""``cachegen``'s symbols as lane-interleaved rANS (``entropy="rans"``, ``cachegen-rans``).

The quantizer is ``codecs/cachegen.py``'s; here is how its int8 symbols become rANS
streams (``kernels/rans.py``) and back on a CPU: one frequency table per (layer, plane)
over the value range worth a table entry (values outside it become escapes), repeated rows
coded once with a row map (what zstd's matches find in Huffman-coded planes), the
encoder, validation of a stored object's stream, and per-plane CPU decoding. The GPU decode
(fused with dequantisation) is ``cachegen._decode_rans_lanes`` over
``rans.decode_dequant``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvcache.codecs import _check
from kvcache.kernels import cpu_native, rans
from kvcache.kvstore.errors import CorruptObjectError

MAX_STEPS = 1 << 16
_MAX_MAPPED_ROWS = (1 << 15) - 1  # row maps are int16


def value_range(counts: np.ndarray, escape_bytes: int) -> tuple[int, int]:
    """counts ``[256]`` (by value + 128) of a plane's codable symbols -> the value range
    ``[lo, hi]`` its table covers (the rest are escapes). The table costs 16 bits per
    value in the range, an escape ``8 * escape_bytes`` less the bits its symbol would
    have cost, so an end is trimmed while the entries it frees (itself and the empty ones
    up to the next value that occurs) cost more than escaping its occurrences."""
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return 0, 0
    total = float(counts.sum())

    def escape_cost(v: int) -> float:
        c = float(counts[v])
        return c * (8 * escape_bytes + math.log2(c / total))

    a, b = 0, nz.size - 1
    while a < b:
        if 16 * (nz[b] - nz[b - 1]) > escape_cost(nz[b]):
            b -= 1
        elif 16 * (nz[a + 1] - nz[a]) > escape_cost(nz[a]):
            a += 1
        else:
            break
    return int(nz[a]) - 128, int(nz[b]) - 128


def distinct_rows(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """key ``[T, W]`` -> (reps int64 ``[U]``: the first row of each distinct row, in
    order; row_map int64 ``[T]``: each row's index into ``reps``). First-occurrence order
    makes ``row_map[t] <= t``, so a decoder expands rows in place (``expand_rows``)."""
    T = key.shape[0]
    if T == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    k = np.ascontiguousarray(key)
    rows = k.view(np.dtype((np.void, k.dtype.itemsize * k.shape[1]))).reshape(T)
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return first[order].astype(np.int64), rank[inverse.reshape(-1)].astype(np.int64)


def expand_rows(plane: torch.Tensor, row_map: torch.Tensor, rows: int) -> None:
    """plane ``[T, C]`` (contiguous rows) whose first ``rows`` rows are the distinct ones
    -> every row ``t`` set to row ``row_map[t]`` (int64 ``[T]``, on ``plane``'s device)."""
    plane.copy_(plane[:rows].index_select(0, row_map))


def _entropy_bits(counts: np.ndarray) -> float:
    """Order-0 entropy, in bits per symbol, of a histogram."""
    total = counts.sum()
    p = counts[counts > 0] / max(total, 1)
    return float(-(p * np.log2(p)).sum())


def code_planes(
    flat_z: torch.Tensor, steps: int, escape_bytes: int, row_len: int,
    row_tags: Sequence[np.ndarray | None],
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[torch.Tensor]]:
    """Planes ``[P, n]`` of rounded steps (rows of ``row_len``) -> lane-interleaved rANS
    (``kernels/rans.py``): tensors, params and each plane's escaped positions (coded as
    the plane's most frequent value, which costs the least; decoding overwrites them).

    A plane whose rows repeat (layer 0's K and V are functions of the token alone, so
    every repeated token repeats them) codes each distinct row once and stores a row map,
    when the symbols saved outweigh the map's 16 bits per row. ``row_tags[p]``
    (``[T, *]`` bytes, or None) must match too for rows to count as one: V's per-token
    scales, so a GPU can dequantise a distinct row once with its first token's scale."""
    P, n = flat_z.shape
    T = n // row_len if row_len else 0
    zf = flat_z.numpy()
    codable = np.isfinite(zf) & (np.abs(zf) <= 127)
    v = np.where(codable, zf, 0).astype(np.int64) + 128
    rows = np.arange(P, dtype=np.int64)[:, None] * rans.ALPHABET
    counts = np.bincount((v + rows)[codable], minlength=P * rans.ALPHABET)
    counts = counts.reshape(P, rans.ALPHABET)
    ranges = [value_range(c, escape_bytes) for c in counts]
    lo = np.array([r[0] for r in ranges])[:, None] + 128
    hi = np.array([r[1] for r in ranges])[:, None] + 128
    esc = ~codable | (v < lo) | (v > hi)
    in_range = (np.arange(rans.ALPHABET)[None] >= lo) & (np.arange(rans.ALPHABET)[None] <= hi)
    mode = np.argmax(np.where(in_range, counts, -1), axis=1)[:, None]
    sym = (np.where(esc, mode, v) - 128).astype(np.int8)
    coded, kept, maps = [], [], []
    for p in range(P):
        plane = sym[p].reshape(T, row_len)
        reps = np.arange(T)
        if 0 < T <= _MAX_MAPPED_ROWS:
            tags = row_tags[p]
            key = plane.view(np.uint8) if tags is None else np.concatenate(
                [plane.view(np.uint8), np.asarray(tags, np.uint8).reshape(T, -1)], axis=1)
            distinct, row_map = distinct_rows(key)
            saved = (T - distinct.size) * row_len * _entropy_bits(counts[p])
            if saved > 16 * T:
                reps = distinct
                maps.append(row_map)
        kept.append(reps.size)
        coded.append(plane[reps].reshape(-1))
    freq = rans.quantize_counts(
        np.stack([np.bincount(c.astype(np.int64) + 128, minlength=rans.ALPHABET)
                  for c in coded]) if coded else np.zeros((0, rans.ALPHABET), np.int64)
    )
    blocks = rans.encode(coded, freq, steps)
    table = np.concatenate([freq[p, lo[p, 0] : hi[p, 0] + 1] for p in range(P)])
    tensors = {
        "words": torch.from_numpy(blocks.words.view(np.int16)),
        "states": torch.from_numpy(blocks.states.view(np.int32)),
        "block_offsets": torch.from_numpy(blocks.offsets.astype(np.int64)),
        "rans_freq": torch.from_numpy(table.astype(np.int16)),
        "row_map": torch.from_numpy(
            np.concatenate(maps or [np.zeros(0, np.int64)]).astype(np.int16)),
    }
    params = {
        "entropy": "rans", "rans_steps": steps,
        "rans_lo": [r[0] for r in ranges], "rans_hi": [r[1] for r in ranges],
        "rans_rows": kept,
    }
    return tensors, params, [torch.from_numpy(np.flatnonzero(e)) for e in esc]


@dataclass(frozen=True)
class RansStream:
    """A validated rANS-coded object's symbols (``kernels/rans.py``): plane ``pl`` is
    ``rows[pl]`` rows of ``row_len`` symbols in the blocks from ``first[pl]`` on; a plane
    coded in fewer rows than the chunk's ``T`` has a row map (``maps``)."""

    words: torch.Tensor  # int16 [W] (uint16 bits), as stored (left on its device)
    states: torch.Tensor  # int32 [NB, LANES] (uint32 bits), as stored
    offsets: np.ndarray  # int64 [NB + 1]
    first: np.ndarray  # int64 [2L + 1]: each plane's first block
    steps: int
    freq: np.ndarray  # int64 [2L, 256], rows summing to rans.M
    T: int
    row_len: int
    rows: list[int]  # [2L]: rows coded per plane
    maps: dict[int, np.ndarray]  # plane -> int64 [T] row map (checked: row_map[t] <= t)

    def symbols_into(self, plane: int, n: int, out: torch.Tensor) -> None:
        """Plane ``plane``'s ``n`` (``T * row_len``) symbols into ``out`` (int8 ``[n]``,
        CPU)."""
        lut = rans.lut_of(self.freq[plane : plane + 1])
        words, states = self.words.cpu(), self.states.cpu()
        m = self.rows[plane] * self.row_len
        b = int(self.first[plane])
        if cpu_native.library() is None:
            z, ok = rans.decode_reference(words, states, self.offsets, [b], [m], self.steps,
                                          torch.from_numpy(lut))
            out[:m].copy_(z[0])
        else:
            ok = rans.decode_plane(
                words.numpy().view(np.uint16), self.offsets[b:],
                states[b:].numpy().view(np.uint32), m, self.steps, lut[0], out[:m].numpy(),
            )
        if not ok:
            raise CorruptObjectError(f"cachegen rANS plane {plane} did not decode as coded")
        if plane in self.maps:
            expand_rows(out[:n].view(self.T, self.row_len), torch.from_numpy(self.maps[plane]),
                        self.rows[plane])

    def selection(
        self, planes: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, list[int], list[int]]:
        """Only the blocks of ``planes``, what a GPU decode of them needs to receive:
        (words, states, offsets from 0, each plane's first block, its symbols). Planes
        stored back to back (a layer, a range of layers) are views, pinned if the object
        is."""
        spans = [(int(self.first[p]), int(self.first[p + 1])) for p in planes]
        if all(s[1] == t[0] for s, t in itertools.pairwise(spans)):
            a, b = (spans[0][0], spans[-1][1]) if spans else (0, 0)
            words = self.words[int(self.offsets[a]) : int(self.offsets[b])]
            states = self.states[a:b]
            offsets = self.offsets[a : b + 1] - self.offsets[a]
        else:
            idx = np.concatenate([np.arange(a, b) for a, b in spans])
            offsets = np.concatenate([[0], np.cumsum(self.offsets[idx + 1] - self.offsets[idx])])
            words = torch.cat([self.words[int(self.offsets[a]) : int(self.offsets[b])]
                               for a, b in spans])
            states = self.states[torch.from_numpy(idx)]
        first = np.cumsum([0] + [b - a for a, b in spans])[:-1]
        return (words, states, offsets.astype(np.int64), [int(f) for f in first],
                [self.rows[p] * self.row_len for p in planes])


def _before(m: np.ndarray) -> np.ndarray:
    """The largest earlier entry of each entry of a row map (-1 for the first)."""
    return np.maximum.accumulate(np.concatenate([[-1], m[:-1]]))


def first_rows(row_map: np.ndarray) -> np.ndarray:
    """A (valid) row map's distinct rows: int64 ``[U]``, the first row of each."""
    return np.flatnonzero(row_map > _before(row_map))


def _row_map_ok(m: np.ndarray, rows: int) -> bool:
    """First-occurrence order over ``rows`` distinct rows: ``m[0] == 0``, each entry at
    most one more than every earlier one, and all of ``0 .. rows - 1`` used."""
    if m.size == 0:
        return rows == 0
    return bool(m.min() >= 0 and (m <= _before(m) + 1).all() and m.max() == rows - 1)


def parse(
    tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any], planes: int, T: int,
    row_len: int, name: str, version: int,
) -> RansStream:
    """Validate a rANS object's symbol tensors and params (``planes`` planes of ``T`` rows
    of ``row_len`` symbols); ``CorruptObjectError`` on anything inconsistent."""
    steps = _check.int_param(params, "rans_steps", name, lo=1, hi=MAX_STEPS)
    values = range(-128, 128)
    lo = _check.int_list(params, "rans_lo", planes, name, values)
    hi = _check.int_list(params, "rans_hi", planes, name, values)
    if any(a > b for a, b in zip(lo, hi, strict=True)):
        raise CorruptObjectError(f"{name} rANS table range has lo > hi")
    sizes = [b - a + 1 for a, b in zip(lo, hi, strict=True)]
    table = _check.tensor(tensors, "rans_freq", torch.int16, (sum(sizes),), name)
    flat = table.cpu().numpy().astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() > rans.M):
        raise CorruptObjectError(f"{name} rANS frequency out of [0, {rans.M}]")
    freq = np.zeros((planes, rans.ALPHABET), np.int64)
    at = 0
    for p, (a, size) in enumerate(zip(lo, sizes, strict=True)):
        freq[p, a + 128 : a + 128 + size] = flat[at : at + size]
        at += size
    if (freq.sum(1) != rans.M).any():
        raise CorruptObjectError(f"{name} rANS frequencies do not sum to {rans.M}")
    # version 4 coded every row; 5 may code a plane's distinct rows only
    rows = [T] * planes if version < 5 else \
        _check.int_list(params, "rans_rows", planes, name, range(min(T, 1), T + 1))
    maps: dict[int, np.ndarray] = {}
    mapped = [p for p in range(planes) if rows[p] < T]
    if version >= 5:
        row_map = _check.tensor(tensors, "row_map", torch.int16, (T * len(mapped),), name)
        flat_map = row_map.cpu().numpy().astype(np.int64)
        for i, p in enumerate(mapped):
            maps[p] = flat_map[i * T : (i + 1) * T]
            if not _row_map_ok(maps[p], rows[p]):
                raise CorruptObjectError(f"{name} row map of plane {p} is not a map of "
                                         f"{T} rows onto {rows[p]} in first-occurrence order")
    words = tensors.get("words")
    if not isinstance(words, torch.Tensor) or words.dtype != torch.int16 \
            or words.dim() != 1:
        raise CorruptObjectError(f"{name} object lacks an int16 'words' tensor")
    first = rans.first_blocks([r * row_len for r in rows], steps)
    nb = int(first[-1])
    states = _check.tensor(tensors, "states", torch.int32, (nb, rans.LANES), name)
    offsets = _check.offsets(
        _check.tensor(tensors, "block_offsets", torch.int64, (nb + 1,), name),
        nb, words.numel(), name, "block_offsets",
    )
    return RansStream(words.contiguous(), states.contiguous(),
                      np.asarray(offsets, dtype=np.int64), first, steps, freq, T, row_len,
                      rows, maps)
