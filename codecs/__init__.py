"""Codecs that turn canonical KV chunks into stored tensors and back (``get_codec``).

``Codec`` is imported on first use: listing codec names (config validation, the CLI) must
not cost a torch import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvcache.codecs.registry import codec_names, get_codec

if TYPE_CHECKING:
    from kvcache.codecs.base import Codec

__all__ = ["Codec", "codec_names", "get_codec"]


def __getattr__(name: str) -> Any:
    if name == "Codec":
        from kvcache.codecs.base import Codec

        return Codec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
