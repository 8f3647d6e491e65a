"""The codec registry: every codec by name, imported lazily on first use.

Add a codec by adding one line here. An unknown name raises ``UnknownCodecError`` listing
the known ones.
"""

from __future__ import annotations

import importlib
from functools import cache

from kvcache.codecs.base import Codec
from kvcache.kvstore.errors import UnknownCodecError

_CODECS: dict[str, str] = {
    "raw": "kvcache.codecs.raw:RawCodec",
}


def codec_names() -> list[str]:
    return sorted(_CODECS)


@cache
def get_codec(name: str) -> Codec:
    try:
        target = _CODECS[name]
    except KeyError:
        raise UnknownCodecError(
            f"unknown codec {name!r}; known codecs: {', '.join(codec_names())}"
        ) from None
    module, _, cls = target.partition(":")
    codec: Codec = getattr(importlib.import_module(module), cls)()
    return codec
