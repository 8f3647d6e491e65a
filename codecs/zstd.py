"""``zstd``: lossless. Each layer's bytes are split into byte planes, then zstd-compressed.

Why byte planes: KV elements are 2-byte floats whose high byte (sign, exponent, top
mantissa bits) is very repetitive and whose low byte is nearly random. Interleaved, zstd
sees noise; split into a high-byte plane and a low-byte plane, the high plane compresses
well (see ``docs/benchmarks.md`` for with/without). Each layer is its own zstd frame so
``decode_layer`` touches only that layer's bytes.

Tensors: ``data`` uint8 ``[total]`` (the frames back to back), ``offsets`` int64
``[layers + 1]``. Params: ``version``, ``shuffle`` (bool), ``level`` (int).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import zstandard

from kvcache.codecs import _check
from kvcache.codecs.base import Codec
from kvcache.kvstore.errors import CorruptObjectError
from kvcache.kvstore.layout import KVLayout

VERSION = 1


def shuffle_bytes(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """uint8 ``[n * itemsize]`` element-major -> plane-major (all byte 0s, all byte 1s, ...)."""
    return np.ascontiguousarray(raw.reshape(-1, itemsize).T).reshape(-1)


def unshuffle_bytes(planes: np.ndarray, itemsize: int) -> np.ndarray:
    return np.ascontiguousarray(planes.reshape(itemsize, -1).T).reshape(-1)


class ZstdCodec(Codec):
    name = "zstd"
    lossless = True

    def __init__(self, *, shuffle: bool = True, level: int = 3) -> None:
        self.shuffle = shuffle
        self.level = level

    def encode(
        self, chunk: torch.Tensor, layout: KVLayout, *, rope_start: int | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """chunk: canonical ``[layers, 2, tokens, kv_heads, head_dim]`` (or MLA)."""
        _check.check_chunk(chunk, layout, self.name, mla_ok=True)
        itemsize = chunk.element_size()
        cctx = zstandard.ZstdCompressor(level=self.level)
        frames: list[bytes] = []
        for layer in chunk.detach().cpu().contiguous():
            raw = layer.reshape(-1).view(torch.uint8).numpy()
            if self.shuffle and itemsize > 1:
                raw = shuffle_bytes(raw, itemsize)
            frames.append(cctx.compress(raw.tobytes()))
        offsets = np.cumsum([0, *(len(f) for f in frames)], dtype=np.int64)
        data = np.frombuffer(b"".join(frames), dtype=np.uint8).copy()
        tensors = {"data": torch.from_numpy(data), "offsets": torch.from_numpy(offsets)}
        return tensors, {"version": VERSION, "shuffle": self.shuffle, "level": self.level}

    def decode_layers(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
        layers: range,
    ) -> torch.Tensor:
        """Decode ``layers``: ``[len(layers), *layer_shape]``."""
        _check.version(params, self.name, VERSION)
        shuffle = _check.bool_param(params, "shuffle", self.name)
        _check.int_param(params, "level", self.name, lo=-(1 << 17), hi=22)
        data = tensors.get("data")
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
            raise CorruptObjectError("zstd object lacks a uint8 'data' tensor")
        off = _check.offsets(
            tensors.get("offsets", torch.empty(0)), layout.num_layers, data.numel(),
            self.name, "offsets",
        )
        shape = layout.chunk_shape(num_tokens)
        dtype = layout.torch_dtype
        itemsize = dtype.itemsize
        layer_bytes = int(np.prod(shape[1:])) * itemsize
        out = torch.empty((len(layers), *shape[1:]), dtype=dtype)
        dctx = zstandard.ZstdDecompressor()
        buf = data.numpy()
        for i, layer in enumerate(layers):
            frame = buf[off[layer] : off[layer + 1]]
            try:
                # max_output_size bounds memory on hostile frames that claim a huge size.
                plain = dctx.decompress(frame.tobytes(), max_output_size=layer_bytes)
            except zstandard.ZstdError as e:
                raise CorruptObjectError(f"zstd frame of layer {layer} is corrupt: {e}") from e
            if len(plain) != layer_bytes:
                raise CorruptObjectError(
                    f"zstd layer {layer} holds {len(plain)} bytes, expected {layer_bytes}"
                )
            raw = np.frombuffer(plain, dtype=np.uint8)
            if shuffle and itemsize > 1:
                raw = unshuffle_bytes(raw, itemsize)
            out[i].view(-1).view(torch.uint8).copy_(torch.from_numpy(raw.copy()))
        return out
