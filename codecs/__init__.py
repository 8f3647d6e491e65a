"""Codecs that turn canonical KV chunks into stored tensors and back (``get_codec``)."""

from kvcache.codecs.base import Codec
from kvcache.codecs.registry import codec_names, get_codec

__all__ = ["Codec", "codec_names", "get_codec"]
