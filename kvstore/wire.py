"""The cache daemon's wire format, shared by the server (``kvcache serve``) and its clients.

HTTP/1.1 with two kinds of body:

- metadata: msgpack maps (``application/msgpack``), small;
- objects: a stream of frames (``application/x-kvcache-objects``), each an 8-byte
  little-endian length followed by that many bytes of one stored-object container (our
  checksummed safetensors format, ``kvstore/container.py``). In a batched get's answer a
  frame of length ``MISS`` (and no bytes) stands for a key the daemon does not hold.

Objects carry their own key and checksum, so a frame needs no other metadata and every
receiver verifies what it got. Frames stream: neither side joins a batch into one buffer.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import msgpack

from kvcache.kvstore.errors import KVCacheError

API = "/v1"
MSGPACK = "application/msgpack"
OBJECTS = "application/x-kvcache-objects"
TENANT_HEADER = "X-KVCache-Tenant"
FRAME_HEADER = struct.Struct("<Q")
MISS = (1 << 64) - 1
# The largest msgpack request body the daemon parses (key lists, not objects).
MAX_METADATA_BYTES = 4 << 20


class ProtocolError(KVCacheError):
    """A message does not follow the wire format (malformed msgpack, a truncated frame)."""


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack_map(data: bytes) -> dict[str, Any]:
    """A msgpack map with string keys, or ``ProtocolError``."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=len(data))
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError(f"body is not valid msgpack: {e}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ProtocolError(
            f"body must be a msgpack map with string keys, got {type(obj).__name__}")
    return obj


def frame_parts(container: list[bytes | memoryview]) -> Iterator[bytes | memoryview]:
    """One object's frame as buffers to send in order (no copy of the object's bytes)."""
    yield FRAME_HEADER.pack(sum(memoryview(p).nbytes for p in container))
    yield from container


def frame_length(head: bytes) -> int:
    if len(head) != FRAME_HEADER.size:
        raise ProtocolError(f"truncated frame header ({len(head)} of 8 bytes)")
    return int(FRAME_HEADER.unpack(head)[0])


def key_list(body: dict[str, Any], field: str = "keys", *, limit: int) -> list[str]:
    """``body[field]`` as a list of at most ``limit`` strings, or ``ProtocolError``."""
    keys = body.get(field)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ProtocolError(f"'{field}' must be a list of key strings")
    if len(keys) > limit:
        raise ProtocolError(f"{len(keys)} keys in one request; the limit is {limit}")
    return keys


# The shared-memory fast path (same node, Unix socket): messages are a 4-byte
# little-endian length and a msgpack map. The daemon's first message carries the memfd of
# its CPU pool as SCM_RIGHTS ancillary data.
MESSAGE_HEADER = struct.Struct("<I")
FAST_PATH_SUFFIX = ".fast"
FAST_PATH_VERSION = 1


def message(body: dict[str, Any]) -> bytes:
    data = pack(body)
    return MESSAGE_HEADER.pack(len(data)) + data
