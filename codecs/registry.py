"""The codec registry: every codec by name, imported lazily on first use.

Add a codec by adding one line here: name -> (``module:Class``, constructor arguments).
A name is part of the stored format (objects record it): never rename one. An unknown name
raises ``UnknownCodecError`` listing the known ones. Decoding never depends on the
instance's arguments — every object's params say how it was made — so e.g. any
``cachegen-*`` instance decodes objects of every level. Objects record the registry name
they were encoded with (``TieredStore`` / ``transcode`` write it into the header).
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING, Any

from kvcache.kvstore.errors import UnknownCodecError

if TYPE_CHECKING:
    from kvcache.codecs.base import Codec

_CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "raw": ("kvcache.codecs.raw:RawCodec", {}),
    "zstd": ("kvcache.codecs.zstd:ZstdCodec", {}),
    "quant": ("kvcache.codecs.quant:QuantCodec", {"bits": 4, "group": 64}),
    "quant-int8": ("kvcache.codecs.quant:QuantCodec", {"bits": 8, "group": 64}),
    "quant-int4-hadamard": (
        "kvcache.codecs.quant:QuantCodec", {"bits": 4, "group": 64, "rotate": True}
    ),
    "quant-int2": ("kvcache.codecs.quant:QuantCodec", {"bits": 2, "group": 32}),
    "fp8": ("kvcache.codecs.fp8:Fp8Codec", {}),
    "cachegen": ("kvcache.codecs.cachegen:CacheGenCodec", {}),
    **{
        f"cachegen-{level}": ("kvcache.codecs.cachegen:CacheGenCodec", {"level": level})
        for level in range(1, 7)
    },
    # the same codec with lane-interleaved rANS instead of Huffman: decodes on a GPU
    "cachegen-rans": ("kvcache.codecs.cachegen:CacheGenCodec", {"entropy": "rans"}),
    **{
        f"cachegen-rans-{level}": (
            "kvcache.codecs.cachegen:CacheGenCodec", {"level": level, "entropy": "rans"}
        )
        for level in range(1, 7)
    },
}

def codec_names() -> list[str]:
    return sorted(_CODECS)


@cache
def get_codec(name: str) -> Codec:
    try:
        target, kwargs = _CODECS[name]
    except KeyError:
        raise UnknownCodecError(
            f"unknown codec {name!r}; known codecs: {', '.join(codec_names())}"
        ) from None
    module, _, cls = target.partition(":")
    codec: Codec = getattr(importlib.import_module(module), cls)(**kwargs)
    return codec
