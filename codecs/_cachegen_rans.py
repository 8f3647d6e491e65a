"""``cachegen``'s symbols as lane-interleaved rANS (``entropy="rans"``, ``cachegen-rans``).

The quantizer is ``codecs/cachegen.py``'s; here is how its int8 symbols become rANS
streams (``kernels/rans.py``) and back on a CPU: one frequency table per (layer, plane)
over the value range worth a table entry (values outside it become escapes), the encoder,
validation of a stored object's stream, and per-plane CPU decoding. The GPU decode
(fused with dequantisation) is ``cachegen._decode_rans_lanes`` over
``rans.decode_dequant``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvcache.codecs import _check
from kvcache.kernels import cpu_native, rans
from kvcache.kvstore.errors import CorruptObjectError

MAX_STEPS = 1 << 16


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


def code_planes(
    flat_z: torch.Tensor, steps: int, escape_bytes: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[torch.Tensor]]:
    """Planes ``[P, n]`` of rounded steps -> lane-interleaved rANS (``kernels/rans.py``):
    tensors, params and each plane's escaped positions (coded as the plane's most frequent
    value, which costs the least; decoding overwrites them)."""
    P = flat_z.shape[0]
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
    v = np.where(esc, mode, v)
    sym = (v - 128).astype(np.int8)
    freq = rans.quantize_counts(
        np.bincount((v + rows).reshape(-1), minlength=P * rans.ALPHABET).reshape(P, -1)
    )
    coded = rans.encode(sym, freq, steps)
    table = np.concatenate([freq[p, lo[p, 0] : hi[p, 0] + 1] for p in range(P)])
    tensors = {
        "words": torch.from_numpy(coded.words.view(np.int16)),
        "states": torch.from_numpy(coded.states.view(np.int32)),
        "block_offsets": torch.from_numpy(coded.offsets.astype(np.int64)),
        "rans_freq": torch.from_numpy(table.astype(np.int16)),
    }
    params = {
        "entropy": "rans", "rans_steps": steps,
        "rans_lo": [r[0] for r in ranges], "rans_hi": [r[1] for r in ranges],
    }
    return tensors, params, [torch.from_numpy(np.flatnonzero(e)) for e in esc]


@dataclass(frozen=True)
class RansStream:
    """A validated rANS-coded object's symbols (``kernels/rans.py``): plane ``pl``'s
    blocks are ``pl * nb ...`` with ``nb = num_blocks(T * C, steps)``."""

    words: torch.Tensor  # int16 [W] (uint16 bits), as stored (left on its device)
    states: torch.Tensor  # int32 [2L * nb, LANES] (uint32 bits), as stored
    offsets: np.ndarray  # int64 [2L * nb + 1]
    steps: int
    freq: np.ndarray  # int64 [2L, 256], rows summing to rans.M

    def symbols_into(self, plane: int, n: int, out: torch.Tensor) -> None:
        """Plane ``plane``'s ``n`` symbols into ``out`` (int8 ``[n]``, CPU)."""
        lut = rans.lut_of(self.freq[plane : plane + 1])
        words, states = self.words.cpu(), self.states.cpu()
        if cpu_native.library() is None:
            z, ok = rans.decode_reference(words, states, self.offsets, [plane], n,
                                          self.steps, torch.from_numpy(lut))
            out.copy_(z[0])
        else:
            nb = rans.num_blocks(n, self.steps)
            ok = rans.decode_plane(
                words.numpy().view(np.uint16), self.offsets[plane * nb :],
                states[plane * nb :].numpy().view(np.uint32), n, self.steps, lut[0],
                out.numpy(),
            )
        if not ok:
            raise CorruptObjectError(f"cachegen rANS plane {plane} did not decode as coded")


def parse(
    tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any], planes: int, n: int,
    name: str,
) -> RansStream:
    """Validate a rANS object's symbol tensors and params (``planes`` planes of ``n``
    symbols); ``CorruptObjectError`` on anything inconsistent."""
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
    words = tensors.get("words")
    if not isinstance(words, torch.Tensor) or words.dtype != torch.int16 \
            or words.dim() != 1:
        raise CorruptObjectError(f"{name} object lacks an int16 'words' tensor")
    nb = planes * rans.num_blocks(n, steps)
    states = _check.tensor(tensors, "states", torch.int32, (nb, rans.LANES), name)
    offsets = _check.offsets(
        _check.tensor(tensors, "block_offsets", torch.int64, (nb + 1,), name),
        nb, words.numel(), name, "block_offsets",
    )
    return RansStream(words.contiguous(), states.contiguous(),
                      np.asarray(offsets, dtype=np.int64), steps, freq)
