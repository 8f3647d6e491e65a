"""Raw escapes: the elements a lossy codec cannot represent, stored verbatim.

A lossy codec codes a group of elements with shared statistics (quant's fp16 scale and
zero, fp8's per-head scale, cachegen's channel means and scales). One NaN or inf among
them poisons those statistics — a NaN scale turns the whole group into NaN, an inf one
rounds every other element to the same value — and a finite value beyond the range of the
statistics' dtype (fp16 for quant and cachegen) overflows them the same way. So before
coding, such elements are taken out: their positions and exact bits are stored here, the
codec codes a stand-in inside the group's range in their place (the group's other elements
keep their normal error), and the decoder writes the exact values back last. A KV cache
with one overflowed value thus loses nothing else.

Tensors (only when there are any: a chunk without them is stored exactly as before):
``raw_idx`` int64 ``[E]`` (flat index into the canonical chunk ``[L, 2, T, H, D]``,
strictly increasing) and ``raw_val`` ``[E]`` of the layout's dtype (the values' bits, NaN
payloads included). A chunk with more than ``MAX_FRACTION`` of its elements to escape is
refused (``UnencodableChunkError``): escapes are for sparse values, a chunk that is mostly
NaN or inf is better kept by a lossless codec (and likely broken upstream).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kvcache.kvstore.errors import CorruptObjectError, UnencodableChunkError
from kvcache.kvstore.layout import KVLayout

MAX_FRACTION = 1 / 16


def _widened(t: torch.Tensor) -> torch.Tensor:
    """float8 as fp16 (aminmax and abs have no float8 kernels; both float8 formats fit in
    fp16, NaN and inf included); other tensors as they are."""
    return t.to(torch.float16) if t.element_size() == 1 and t.is_floating_point() else t


def finite_within(t: torch.Tensor, limit: float) -> bool:
    """Whether every element of ``t`` is finite with ``|x| <= limit``: one pass of
    ``aminmax`` (which propagates NaN), a tenth of ``isfinite().all()``'s cost."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(_widened(t))
    # as Python floats: a limit beyond the dtype's range would round to inf in it
    return float(lo) >= -limit and float(hi) <= limit


def split(
    chunk: torch.Tensor, limit: float, codec: str
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """chunk: canonical ``[L, 2, T, H, D]`` -> (the escapes' tensors, a bool mask of
    ``chunk``'s shape marking them), or ``({}, None)`` when every element is finite with
    ``|x| <= limit`` (the common case: one ``aminmax``). Raises ``UnencodableChunkError``
    when more than ``MAX_FRACTION`` of the elements would be escapes."""
    if finite_within(chunk, limit):
        return {}, None
    # NaN compares false: escaped too; a limit past the dtype's range would round to inf
    wide = _widened(chunk)
    mask = ~(wide.abs() <= min(limit, torch.finfo(wide.dtype).max))
    flat = mask.reshape(-1).nonzero().squeeze(1)
    if flat.numel() > MAX_FRACTION * chunk.numel():
        nan = int(wide.isnan().sum())
        inf = int(wide.isinf().sum())
        raise UnencodableChunkError(
            f"codec {codec!r} cannot store this chunk: {flat.numel()} of its {chunk.numel()} "
            f"values ({nan} NaN, {inf} inf, {flat.numel() - nan - inf} beyond +-{limit:g}) "
            f"would have to be kept verbatim (at most {MAX_FRACTION:.2%} are); store it with "
            f"'zstd' or 'raw', which keep every value exactly, or check where they come from"
        )
    val = chunk.reshape(-1)[flat]
    return {"raw_idx": flat, "raw_val": val}, mask


def stand_in(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with every ``mask``ed element replaced by the mean of the unmasked elements
    along ``dim`` (0 where there are none), kept inside their range: a value that neither
    widens a group's range nor pulls its statistics. A new tensor; ``x`` is untouched."""
    keep = ~mask
    xf = torch.where(keep, x.float(), 0.0)
    n = keep.sum(dim, keepdim=True)
    mean = xf.sum(dim, keepdim=True) / n.clamp_min(1)
    # the fp32 mean can round past the extreme it averages: clamp it back inside
    lo = torch.where(keep, x.float(), float("inf")).amin(dim, keepdim=True)
    hi = torch.where(keep, x.float(), float("-inf")).amax(dim, keepdim=True)
    mean = torch.where(n > 0, torch.minimum(torch.maximum(mean, lo), hi), 0.0)
    return torch.where(mask, mean.to(x.dtype), x)


@dataclass(frozen=True)
class RawEscapes:
    """A validated object's raw escapes (CPU tensors)."""

    idx: torch.Tensor  # int64 [E], strictly increasing, in [0, L * layer_numel)
    val: torch.Tensor  # [E] of the layout's dtype
    layer_numel: int  # 2 * T * H * D

    def apply(self, out: torch.Tensor, layers: Sequence[int]) -> None:
        """Write the escapes of ``layers`` into ``out`` (``[len(layers), 2, T, H, D]``,
        any strides, on any device): ``out[i]`` holds layer ``layers[i]``."""
        if not self.idx.numel() or not len(layers):
            return
        n = self.layer_numel
        bounds = torch.tensor([[layer * n, (layer + 1) * n] for layer in layers])
        spans = torch.searchsorted(self.idx, bounds).tolist()
        pos = torch.cat([torch.full((b - a,), i, dtype=torch.int64)
                         for i, (a, b) in enumerate(spans)])
        if not pos.numel():
            return
        sel = torch.cat([torch.arange(a, b) for a, b in spans])
        local = self.idx[sel] - torch.tensor(list(layers))[pos] * n
        coords = [pos]
        for size in reversed(out.shape[2:]):
            coords.insert(1, local % size)
            local = local // size
        coords.insert(1, local)  # K or V
        dev = out.device
        out.index_put_(tuple(c.to(dev) for c in coords), self.val[sel].to(dev, out.dtype))


def parse(
    tensors: Mapping[str, torch.Tensor], layout: KVLayout, num_tokens: int, codec: str,
    readable: bool,
) -> RawEscapes:
    """The object's raw escapes, validated (``CorruptObjectError`` on anything
    inconsistent); none when it has no ``raw_*`` tensors. ``readable``: the object's
    format version has them (older ones must not)."""
    shape = layout.chunk_shape(num_tokens)
    layer_numel = 1
    for size in shape[1:]:
        layer_numel *= size
    idx, val = tensors.get("raw_idx"), tensors.get("raw_val")
    if idx is None and val is None:
        return RawEscapes(torch.zeros(0, dtype=torch.int64),
                          torch.zeros(0, dtype=layout.torch_dtype), layer_numel)
    if not readable:
        raise CorruptObjectError(f"{codec} object holds raw escapes, which its format "
                                 "version does not have")
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 1:
        raise CorruptObjectError(f"{codec} object lacks an int64 [E] 'raw_idx' tensor")
    E = idx.numel()
    if not isinstance(val, torch.Tensor) or val.dtype != layout.torch_dtype \
            or tuple(val.shape) != (E,):
        got_val = None if not isinstance(val, torch.Tensor) else (tuple(val.shape), val.dtype)
        raise CorruptObjectError(f"{codec} tensor 'raw_val' is {got_val}, expected ({E},) "
                                 f"{layout.dtype}")
    idx = idx.cpu()
    total = layer_numel * shape[0]
    if E and (int(idx[0]) < 0 or int(idx[-1]) >= total or not bool((idx[1:] > idx[:-1]).all())):
        raise CorruptObjectError(f"{codec} raw escape indices are not increasing within "
                                 f"[0, {total})")
    return RawEscapes(idx.contiguous(), val.cpu().contiguous(), layer_numel)
