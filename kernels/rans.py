"""Lane-interleaved rANS: an entropy coder whose decoder runs lane-parallel on a GPU.

Huffman (zstd's literal coder, which ``cachegen`` uses by default) decodes one symbol
after another from one bit stream: fast on a CPU core, hopeless across thousands of GPU
threads. Here every symbol of a plane belongs to one of many independent rANS states, so
a GPU decodes them side by side (DietGPU's layout), and a CPU core decodes the same bytes
one lane after another.

Format (fixed but for ``steps``, which the coded object records):

- Symbols are int8 values. A plane of ``n`` symbols is cut into blocks of
  ``LANES * steps``; symbol ``k`` of a block is coded by lane ``k % LANES`` at step
  ``k // LANES``, so at every step a block's lanes decode ``LANES`` consecutive symbols
  (coalesced stores). The last block of a plane may be shorter (its last step partial).
- A lane is a 32-bit rANS state in ``[RANS_L, 2^32)`` with probabilities out of
  ``2^SCALE_BITS`` and 16-bit renormalisation: it reads at most one word per symbol. The
  lanes of a block share one stream of 16-bit words, taken at each step by the lanes that
  need one, in lane order: a prefix sum over the lanes on a GPU, a plain loop on a CPU.
- Stored per block: its lanes' final encoder states (uint32) and its range of words.
  Encoding starts every lane at ``RANS_L``, so decoding must end there having read exactly
  the block's words: a free check that a block decoded as it was coded.
- Per plane: a frequency table over the 256 int8 values (``freq``, summing to
  ``2^SCALE_BITS``; a symbol that occurs must have ``freq > 0``).

Overheads: 32 bits per lane per ``steps`` symbols (0.03 bits/symbol at 1024 steps) plus
the tables; rANS itself codes within ~0.1% of the table's entropy, where Huffman on
symbol pairs loses 2-4%.

Here: table helpers, encoders (C, ``kernels/cpu_native.py``, and a numpy reference),
decoders (C per plane, AVX-512 where the CPU has it; a vectorised torch reference) and
``decode_dequant``, the GPU path: decode fused with cachegen's ``x = mu + z * delta``
(Triton kernel in ``kernels/_triton/rans.py``; the torch reference elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from kvcache.kernels import cpu_native
from kvcache.kernels.dispatch import Impl, use_triton

LANES = 32
SCALE_BITS = 12
M = 1 << SCALE_BITS  # probabilities are multiples of 1 / M
RANS_L = 1 << 16  # lower bound of a normalised state
ALPHABET = 256  # int8 values; tables are indexed by value + 128
DEFAULT_STEPS = 1024


class Coded(NamedTuple):
    """Planes coded one after the other, each in ``num_blocks(n, steps)`` blocks."""

    words: np.ndarray  # uint16 [W]
    states: np.ndarray  # uint32 [NB, LANES]
    offsets: np.ndarray  # int64 [NB + 1]: block b's words are words[offsets[b]:offsets[b + 1]]


def num_blocks(n: int, steps: int) -> int:
    """Blocks of a plane of ``n`` symbols."""
    return -(-n // (LANES * steps))


def quantize_counts(counts: np.ndarray) -> np.ndarray:
    """counts int ``[P, 256]`` -> freq int64 ``[P, 256]``: each row sums to ``M``, every
    counted symbol gets at least 1 (an empty row becomes all-``M`` on value 0)."""
    counts = np.asarray(counts, dtype=np.int64)
    freq = np.zeros_like(counts)
    for p, row in enumerate(counts):
        total = int(row.sum())
        if total == 0:
            freq[p, 128] = M
            continue
        f = np.where(row > 0, np.maximum(1, (row * M + total // 2) // total), 0)
        # fix the sum on the most frequent symbols, where it costs the least: take from (or
        # give to) the largest entries, never taking one below 1
        diff = M - int(f.sum())
        order = np.argsort(-f, kind="stable")
        i = 0
        while diff:
            s = order[i % len(order)]
            if diff > 0:
                f[s] += diff
                diff = 0
            elif f[s] > 1:
                take = min(-diff, int(f[s]) - 1)
                f[s] -= take
                diff += take
            i += 1
        freq[p] = f
    return freq


def lut_of(freq: np.ndarray) -> np.ndarray:
    """freq ``[P, 256]`` (rows summing to ``M``) -> int32 ``[P, M]``: per slot,
    ``sym | (freq - 1) << 8 | cum << 20`` (sym = value + 128), what a decoder needs to
    turn a state's low bits into the symbol and the next state."""
    freq = np.asarray(freq, dtype=np.int64)
    P = freq.shape[0]
    cum = np.cumsum(freq, axis=1) - freq
    entry = np.arange(ALPHABET, dtype=np.int64)[None, :] | ((freq - 1) << 8) | (cum << 20)
    lut = np.repeat(entry.reshape(-1), freq.reshape(-1))  # rows sum to M: [P * M]
    return lut.astype(np.uint32).view(np.int32).reshape(P, M)


# -- encode ------------------------------------------------------------------------------


def encode(
    planes: np.ndarray | Sequence[np.ndarray], freq: np.ndarray, steps: int = DEFAULT_STEPS
) -> Coded:
    """planes: int8 ``[P, n]``, or ``P`` int8 ``[n_p]`` of any lengths; freq ``[P, 256]``
    -> the planes' blocks, plane after plane (plane ``p``'s start at block
    ``first_blocks(ns, steps)[p]``). C kernel when available, else ``encode_reference``;
    the same bytes either way."""
    flat = [np.ascontiguousarray(p, dtype=np.int8).reshape(-1) for p in planes]
    ns = [p.size for p in flat]
    lib = cpu_native.library()
    if lib is None:
        if len(set(ns)) <= 1:  # one vectorised pass
            return encode_reference(np.stack(flat) if flat else np.empty((0, 0), np.int8),
                                    freq, steps)
        return _concat([encode_reference(p[None], freq[i : i + 1], steps)
                        for i, p in enumerate(flat)])
    first = first_blocks(ns, steps)
    freq32 = np.ascontiguousarray(freq, dtype=np.uint32)
    cum32 = (np.cumsum(freq32, axis=1, dtype=np.uint32) - freq32).astype(np.uint32)
    words = np.empty(sum(ns), np.uint16)
    scratch = np.empty(max(ns, default=1) or 1, np.uint16)
    states = np.empty((first[-1], LANES), np.uint32)
    counts = np.empty(first[-1], np.int64)
    total = 0
    for p, sym in enumerate(flat):
        total += lib.kvc_rans_encode_plane(
            sym.ctypes.data, sym.size, steps, freq32[p].ctypes.data, cum32[p].ctypes.data,
            words[total:].ctypes.data, scratch.ctypes.data, states[first[p]:].ctypes.data,
            counts[first[p]:].ctypes.data,
        )
    return Coded(words[:total].copy(), states, np.concatenate([[0], np.cumsum(counts)]))


def _concat(parts: Sequence[Coded]) -> Coded:
    """Blocks coded separately, back to back."""
    base = np.cumsum([0] + [c.words.size for c in parts])
    return Coded(
        np.concatenate([c.words for c in parts] or [np.empty(0, np.uint16)]),
        np.concatenate([c.states for c in parts] or [np.empty((0, LANES), np.uint32)]),
        np.concatenate([[0]] + [c.offsets[1:] + b for c, b in zip(parts, base, strict=False)])
        .astype(np.int64),
    )


def first_blocks(ns: Sequence[int], steps: int) -> np.ndarray:
    """int64 ``[P + 1]``: the first block of each of ``P`` planes of ``ns`` symbols coded
    back to back (the last entry: the number of blocks)."""
    return np.concatenate([[0], np.cumsum([num_blocks(n, steps) for n in ns])]).astype(np.int64)


def encode_reference(sym: np.ndarray, freq: np.ndarray, steps: int = DEFAULT_STEPS) -> Coded:
    """Numpy encoder, vectorised over every lane of every block of every plane."""
    sym = np.asarray(sym, dtype=np.int8)
    P, n = sym.shape
    nb = num_blocks(n, steps)
    B = LANES * steps
    freq = np.asarray(freq, dtype=np.uint64)
    cum = np.cumsum(freq, axis=1) - freq
    padded = np.zeros((P, nb * B), np.int64)
    padded[:, :n] = sym.astype(np.int64) + 128
    # [steps, P, nb, LANES]: one contiguous slice per step
    v = padded.reshape(P, nb, steps, LANES).transpose(2, 0, 1, 3)
    valid = (np.arange(nb * B) < n).reshape(nb, steps, LANES).transpose(1, 0, 2)[:, None]
    rows = np.arange(P)[None, :, None, None]
    f_all = freq[rows, v]
    c_all = cum[rows, v]
    x = np.full((P, nb, LANES), RANS_L, np.uint64)
    words = np.zeros((steps, P, nb, LANES), np.uint16)
    emit = np.zeros((steps, P, nb, LANES), bool)
    for s in range(steps - 1, -1, -1):
        ok = valid[s]
        f = np.maximum(f_all[s], 1)
        e = ok & (x >= (f << np.uint64(32 - SCALE_BITS)))
        words[s] = x & np.uint64(0xFFFF)
        emit[s] = e
        x = np.where(e, x >> np.uint64(16), x)
        x = np.where(ok, ((x // f) << np.uint64(SCALE_BITS)) + x % f + c_all[s], x)
    # decoding order: plane, block, step, lane
    emit_d = emit.transpose(1, 2, 0, 3)
    out = words.transpose(1, 2, 0, 3)[emit_d]
    counts = emit_d.reshape(P * nb, -1).sum(1)
    return Coded(out.astype(np.uint16), x.reshape(P * nb, LANES).astype(np.uint32),
                 np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


# -- decode on a CPU ---------------------------------------------------------------------


def decode_plane(
    words: np.ndarray, offsets: np.ndarray, states: np.ndarray, n: int, steps: int,
    lut: np.ndarray, out: np.ndarray, simd: bool = True,
) -> bool:
    """Decode one plane with the C kernel into ``out`` (int8 ``[n]``). words uint16
    ``[W]``; offsets int64 ``[nb + 1]`` (the plane's blocks, absolute into words);
    states uint32 ``[nb, LANES]``; lut int32 ``[M]``. simd: the AVX-512 block decoder
    where the CPU has it (``has_simd``; the same result, ~5x faster), else the plain C
    loop. Returns False when a block did not decode as it was coded. Raises RuntimeError
    without a C compiler (use ``decode_reference``). All contiguous; the caller checks
    sizes."""
    lib = cpu_native.library()
    if lib is None:
        raise RuntimeError("no C compiler: use decode_reference")
    bad = lib.kvc_rans_decode_plane(
        words.ctypes.data, offsets.ctypes.data, states.ctypes.data, n, steps,
        lut.ctypes.data, out.ctypes.data, int(simd),
    )
    return bool(bad == 0)


def has_simd() -> bool:
    """Whether the C decoder was built with its AVX-512 block decoder (this CPU has it)."""
    lib = cpu_native.library()
    return lib is not None and bool(lib.kvc_has_rans_simd())


def _block_table(
    offsets: np.ndarray, first: Sequence[int], ns: Sequence[int], steps: int,
    out_offsets: Sequence[int],
) -> np.ndarray:
    """int64 ``[NBs, 7]``, one row per block of the selected planes (plane ``q`` of the
    selection: ``ns[q]`` symbols in the blocks from ``first[q]`` on, written from
    ``out_offsets[q]``): word start, word end, symbols, q, output offset, position in the
    plane, stored block index."""
    B = LANES * steps
    nb = [num_blocks(n, steps) for n in ns]
    q = np.repeat(np.arange(len(ns), dtype=np.int64), nb)
    j = np.concatenate([np.arange(k, dtype=np.int64) for k in nb] or [np.empty(0, np.int64)])
    stored = np.asarray(first, dtype=np.int64)[q] + j
    pos0 = j * B
    return np.stack([
        offsets[stored], offsets[stored + 1],
        np.minimum(B, np.asarray(ns, dtype=np.int64)[q] - pos0), q,
        np.asarray(out_offsets, dtype=np.int64)[q] + pos0, pos0, stored,
    ], axis=1)


def decode_reference(
    words: torch.Tensor, states: torch.Tensor, offsets: np.ndarray, first: Sequence[int],
    ns: Sequence[int], steps: int, lut: torch.Tensor,
) -> tuple[torch.Tensor, bool]:
    """Torch decoder, vectorised over every lane of every selected block (the reference
    of the C and Triton decoders). words int16 ``[W]`` (uint16 bits); states int32
    ``[NB, LANES]`` (uint32 bits); offsets int64 ``[NB + 1]``; the selection: plane ``q``
    is ``ns[q]`` symbols in the blocks from ``first[q]`` on; lut int32 ``[Q, M]``.
    Returns (int8 ``[Q, max(ns)]``, plane ``q``'s symbols in ``[:ns[q]]``; every block
    decoded as coded)."""
    dev = words.device
    width = num_blocks(max(ns, default=0), steps) * LANES * steps
    table = torch.from_numpy(
        _block_table(offsets, first, ns, steps, [q * width for q in range(len(ns))])
    ).to(dev)
    w0, w1, nsym, out0, stored = table[:, 0], table[:, 1], table[:, 2], table[:, 4], table[:, 6]
    q = table[:, 3]
    x = states.to(dev)[stored].long() & 0xFFFFFFFF  # [NBs, LANES]
    rows = lut.to(dev).long()[q]  # [NBs, M]
    w = torch.cat([words.long() & 0xFFFF, torch.zeros(1, dtype=torch.long, device=dev)])
    lanes = torch.arange(LANES, device=dev)
    wpos = w0.clone()
    z = torch.empty(len(table), steps, LANES, dtype=torch.int8, device=dev)
    for s in range(steps):
        valid = (s * LANES + lanes)[None, :] < nsym[:, None]
        slot = x & (M - 1)
        e = torch.gather(rows, 1, slot)
        z[:, s] = ((e & 0xFF) - 128).to(torch.int8)
        nxt = (((e >> 8) & 0xFFF) + 1) * (x >> SCALE_BITS) + slot - ((e >> 20) & 0xFFF)
        x = torch.where(valid, nxt, x)
        need = valid & (x < RANS_L)
        ni = need.long()
        pos = wpos[:, None] + ni.cumsum(1) - ni
        pos = torch.where(need & (pos < w1[:, None]), pos, len(w) - 1)  # the zero pad
        x = torch.where(need, (x << 16) | w[pos], x)
        wpos += ni.sum(1)
    ok = bool((x == RANS_L).all()) and bool((wpos == w1).all())
    out = torch.zeros(len(ns) * width, dtype=torch.int8, device=dev)
    idx = out0[:, None] + torch.arange(steps * LANES, device=dev)[None, :]
    out[idx.reshape(-1)] = z.view(len(table), -1).reshape(-1)
    return out.view(len(ns), width)[:, : max(ns, default=0)], ok


# -- the GPU path: decode fused with dequantisation --------------------------------------


def decode_dequant(
    words: torch.Tensor,
    states: torch.Tensor,
    offsets: np.ndarray,
    first: Sequence[int],
    ns: Sequence[int],
    steps: int,
    lut: torch.Tensor,
    mu: torch.Tensor,
    k_delta: torch.Tensor,
    v_delta: torch.Tensor,
    head_dim: int,
    out: torch.Tensor,
    impl: Impl = "auto",
) -> bool:
    """Decode cachegen planes and dequantise them in one pass. Plane ``q`` of the
    selection (``ns[q]`` symbols in the blocks from ``first[q]`` on; layer ``q // 2`` of
    the selection, K when ``q`` is even) fills ``out[q, :ns[q]]`` with
    ``mu[q, c] + z * delta``, delta being ``k_delta[q // 2, c]`` (K, per channel) or
    ``v_delta[q // 2, t, c // head_dim]`` (V, per row ``t`` and head).

    words int16 ``[W]``, states int32 ``[NB, LANES]``, lut int32 ``[Q, M]``, mu fp32
    ``[Q, C]``, k_delta fp32 ``[Q / 2, C]``, v_delta fp32 ``[Q / 2, T, H]``: all on
    ``out``'s device; offsets int64 ``[NB + 1]`` on the host. out: ``[Q, T * C]`` of
    bf16/fp16/fp32 with unit stride along its rows (planes may be apart); a plane coded
    in fewer rows leaves the rest of its row of ``out`` undefined. Returns whether every
    block decoded as it was coded (on a GPU this waits for the kernel). Escapes are not
    this function's business.
    """
    Q, n = out.shape
    C = mu.shape[1]
    T = n // C
    if max(ns, default=0) > n:
        raise ValueError(f"a plane of {max(ns)} symbols does not fit rows of {n}")
    if not use_triton(impl, out.device):
        z, ok = decode_reference(words, states, offsets, first, ns, steps, lut)
        zf = torch.zeros(Q, n, device=out.device)
        zf[:, : z.shape[1]] = z.to(out.device)
        zf = zf.view(Q // 2, 2, T, C)
        k = mu.view(Q // 2, 2, 1, C)[:, 0] + zf[:, 0] * k_delta[:, None, :]
        v = mu.view(Q // 2, 2, 1, C)[:, 1] + zf[:, 1] * v_delta.repeat_interleave(head_dim, -1)
        out.copy_(torch.stack([k, v], 1).view(Q, n))
        return ok
    from kvcache.kernels._triton.rans import rans_dequant_kernel

    table = _block_table(offsets, first, ns, steps, [q * out.stride(0) for q in range(Q)])
    meta = torch.from_numpy(np.ascontiguousarray(table)).to(out.device)
    status = torch.empty(len(table), dtype=torch.int32, device=out.device)
    if len(table):
        rans_dequant_kernel[(len(table),)](
            words, states, meta, lut, mu, torch.cat([k_delta.flatten(), v_delta.flatten()]),
            out, status, T, C, C // head_dim, head_dim, k_delta.numel(),
            LANES=LANES, SCALE_BITS=SCALE_BITS, RANS_L=RANS_L, META=table.shape[1],
            num_warps=1,
        )
    return bool(status.all())
