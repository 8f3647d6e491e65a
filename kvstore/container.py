"""The stored-object container: a versioned, self-describing, checksummed safetensors file.

Bytes layout (readable by the ``safetensors`` library; no code is ever executed on load):

    u64 little-endian N | N bytes of JSON header (space padded to 8) | tensor data

The JSON header holds one entry per named tensor (dtype, shape, data offsets) and a
``__metadata__`` map with two strings: ``kvcache`` (our ``ObjectHeader`` as JSON) and
``checksum``. The checksum is xxh3-128 over the *whole* file with the checksum's own hex
digits replaced by zeros, so a flipped bit anywhere — header, tensor table or payload —
is caught. Decoding checks it before trusting any field.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

import xxhash

from kvcache.kvstore.errors import CorruptObjectError, KVCacheError
from kvcache.kvstore.layout import KVLayout

if TYPE_CHECKING:
    import torch

FORMAT = "kvcache-object"
FORMAT_VERSION = 1
_CHECKSUM_PLACEHOLDER = "0" * 32
_MAX_HEADER_BYTES = 16 * 1024 * 1024

# safetensors dtype name -> (torch dtype name, bytes per element). Torch itself is imported
# when tensors are built or serialised, not to read headers (the admin commands do that).
_ST_TYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1),
}


@cache
def _st_names() -> dict[str, torch.dtype]:
    import torch

    return {st: getattr(torch, name) for st, (name, _) in _ST_TYPES.items()}


@cache
def _st_dtypes() -> dict[torch.dtype, str]:
    return {v: k for k, v in _st_names().items()}


# How an object's key names its chunk (ObjectHeader.keying).
KEYINGS = ("prefix", "segment")


@dataclass(frozen=True)
class ObjectHeader:
    """Everything needed to interpret an object's tensors, independent of where it lives.

    ``rope_start``: K was rotated at positions ``rope_start .. rope_start + num_tokens - 1``;
    ``None`` means the keys are stored before RoPE was applied. ``keying``: how ``key``
    names the chunk — ``"prefix"`` (its tokens and everything before them) or
    ``"segment"`` (a blended segment's own tokens, ``connectors/blend_plan.py``).
    """

    key: str
    layout: KVLayout
    num_tokens: int
    codec: str = "raw"
    codec_params: Mapping[str, Any] = field(default_factory=dict)
    rope_start: int | None = 0
    created_at: float = field(default_factory=time.time)
    keying: str = "prefix"

    def __post_init__(self) -> None:
        if self.keying not in KEYINGS:
            raise CorruptObjectError(f"keying must be one of {KEYINGS}, got {self.keying!r}")

    def to_json(self) -> dict[str, Any]:
        # Prefix objects' headers are what they were before segments existed.
        extra = {} if self.keying == "prefix" else {"keying": self.keying}
        return extra | {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "key": self.key,
            "layout": self.layout.to_dict(),
            "num_tokens": self.num_tokens,
            "codec": self.codec,
            "codec_params": dict(self.codec_params),
            "rope_start": self.rope_start,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ObjectHeader:
        if not isinstance(d, Mapping):
            raise CorruptObjectError(f"object header is a {type(d).__name__}, not a map")
        if d.get("format") != FORMAT:
            raise CorruptObjectError(f"not a kvcache object (format={d.get('format')!r})")
        if d.get("version") != FORMAT_VERSION:
            raise CorruptObjectError(
                f"unsupported kvcache object version {d.get('version')!r} "
                f"(this build reads version {FORMAT_VERSION})"
            )
        try:
            return cls(
                key=str(d["key"]),
                layout=KVLayout.from_dict(d["layout"]),
                num_tokens=int(d["num_tokens"]),
                codec=str(d["codec"]),
                codec_params=dict(d["codec_params"]),
                rope_start=None if d["rope_start"] is None else int(d["rope_start"]),
                created_at=float(d["created_at"]),
                keying=str(d.get("keying", "prefix")),
            )
        except (KeyError, TypeError, ValueError, KVCacheError) as e:
            raise CorruptObjectError(f"malformed kvcache object header: {e}") from e


@dataclass
class StoredObject:
    """A header plus the codec's named tensors (for ``raw``: one tensor, ``"kv"``)."""

    header: ObjectHeader
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _byte_view(t: torch.Tensor) -> memoryview:
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype not in _st_dtypes():
        raise KVCacheError(f"tensor dtype {t.dtype} cannot be stored")
    return t.reshape(-1).view(torch.uint8).numpy().data


def encode_parts(obj: StoredObject) -> list[bytes | memoryview]:
    """The container as buffers to write in order: the header, then each tensor's bytes.

    Tensor parts view the tensors' memory (no copy for contiguous CPU tensors), so a file
    write can stream them straight from where they are; ``encode_object`` joins them.
    """
    views: list[memoryview] = []
    table: dict[str, Any] = {}
    offset = 0
    for name in sorted(obj.tensors):
        t = obj.tensors[name]
        mv = _byte_view(t)
        views.append(mv)
        table[name] = {
            "dtype": _st_dtypes()[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + mv.nbytes],
        }
        offset += mv.nbytes
    table["__metadata__"] = {
        "kvcache": json.dumps(obj.header.to_json(), sort_keys=True, separators=(",", ":")),
        "checksum": _CHECKSUM_PLACEHOLDER,
    }
    header = json.dumps(table, separators=(",", ":")).encode()
    header = struct.pack("<Q", len(header) + (-len(header) % 8)) + header
    header += b" " * (-len(header) % 8)
    h = xxhash.xxh3_128(header)
    for mv in views:
        h.update(mv)
    # The placeholder occurs exactly once: it is the only quoted 32-zero string we emit.
    needle = b'"checksum":"' + _CHECKSUM_PLACEHOLDER.encode() + b'"'
    at = header.index(needle) + len('"checksum":"')
    header = header[:at] + h.hexdigest().encode() + header[at + 32 :]
    return [header, *views]


def encode_object(obj: StoredObject) -> bytes:
    """Serialize ``obj`` into the container format (one copy of the payload)."""
    return b"".join(encode_parts(obj))


def _parse_header(
    read_at: Callable[[int, int], bytes], size: int
) -> tuple[int, bytes, dict[str, Any], str, dict[str, Any]]:
    """(header length, raw header, tensor table, stored checksum, our header JSON)."""
    head = read_at(0, 8) if size >= 8 else b""
    if len(head) < 8:
        raise CorruptObjectError(f"object truncated: {size} bytes")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER_BYTES or 8 + n > size:
        raise CorruptObjectError(f"object truncated or not a container (header length {n})")
    raw_header = read_at(8, n)
    try:
        table = json.loads(raw_header)
        meta = table.pop("__metadata__")
        return n, raw_header, table, str(meta["checksum"]), json.loads(meta["kvcache"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptObjectError(f"object header is not valid kvcache JSON: {e}") from e


def read_header_unverified(read_at: Callable[[int, int], bytes], size: int) -> ObjectHeader:
    """Only the header of a container of ``size`` bytes, for listings. No checksum is
    verified (that needs every byte); ``read_at(offset, length)`` returns bytes. Raises
    ``CorruptObjectError`` on anything that is not a well-formed header."""
    return ObjectHeader.from_json(_parse_header(read_at, size)[4])


def header_of_bytes(data: bytes | bytearray | memoryview) -> ObjectHeader:
    """``read_header_unverified`` of a container held in memory."""
    mv = memoryview(data).cast("B")
    return read_header_unverified(lambda o, n: bytes(mv[o : o + n]), mv.nbytes)


def _header_for_checksum(raw_header: bytes) -> bytes:
    """``raw_header`` with its checksum digits zeroed, as they were when it was computed."""
    needle = b'"checksum":"'
    at = raw_header.find(needle)
    end = raw_header.find(b'"', at + len(needle)) if at >= 0 else -1
    if at < 0 or end - at - len(needle) != 32:
        raise CorruptObjectError("object checksum field is malformed")
    at += len(needle)
    return raw_header[:at] + _CHECKSUM_PLACEHOLDER.encode() + raw_header[at + 32 :]


def decode_header(
    data: bytes | bytearray | memoryview, *, digest: str | None = None
) -> tuple[ObjectHeader, dict[str, Any]]:
    """Verify ``data`` and return its header and tensor table (no tensors built).

    ``digest``: the checksum already computed over ``data`` while it was read
    (``read_object``); otherwise it is computed here.
    """
    mv = memoryview(data).cast("B")
    n, raw_header, table, stored_sum, header_json = _parse_header(
        lambda o, k: bytes(mv[o : o + k]), mv.nbytes
    )
    if digest is None:
        h = xxhash.xxh3_128()
        h.update(mv[:8])
        h.update(_header_for_checksum(raw_header))
        h.update(mv[8 + n :])
        digest = h.hexdigest()
    if digest != stored_sum:
        raise CorruptObjectError("object checksum mismatch: stored bytes are corrupt")
    header = ObjectHeader.from_json(header_json)
    payload_len = mv.nbytes - 8 - n
    end_max = 0
    for name, entry in table.items():
        try:
            b, e = entry["data_offsets"]
            itemsize = _ST_TYPES[entry["dtype"]][1]
            shape = entry["shape"]
            # Only plain non-negative ints: anything else would fail later, outside the
            # checks, as a TypeError or a RuntimeError from torch.
            if not all(type(x) is int and x >= 0 for x in (b, e, *shape)):
                raise ValueError(f"offsets and shape must be ints >= 0: {b}, {e}, {shape}")
            numel = 1
            for d in shape:
                numel *= d
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CorruptObjectError(f"bad tensor entry {name!r}: {err}") from err
        if not (0 <= b <= e <= payload_len) or e - b != numel * itemsize:
            raise CorruptObjectError(f"tensor {name!r} does not fit the payload")
        end_max = max(end_max, e)
    if end_max != payload_len:
        raise CorruptObjectError("payload length does not match the tensor table")
    return header, table


def decode_object(
    data: bytes | bytearray | memoryview, *, copy: bool = False, digest: str | None = None
) -> StoredObject:
    """Verify and parse a container. Tensors view ``data`` unless ``copy`` (or misaligned).
    ``digest``: see ``decode_header``."""
    import torch

    header, table = decode_header(data, digest=digest)
    mv = memoryview(data).cast("B")
    (n,) = struct.unpack("<Q", mv[:8])
    base = 8 + n
    with warnings.catch_warnings():
        # torch warns that read-only buffers (bytes) give non-writable tensors; we never
        # write through these views, and callers that need to pass copy=True.
        warnings.simplefilter("ignore", UserWarning)
        flat = (
            torch.frombuffer(mv, dtype=torch.uint8)
            if mv.nbytes
            else torch.empty(0, dtype=torch.uint8)
        )
    if copy:
        flat = flat.clone()
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in table.items():
        dtype = _st_names()[entry["dtype"]]
        b, e = entry["data_offsets"]
        part = flat[base + b : base + e]
        if (base + b) % dtype.itemsize:
            part = part.clone()
        tensors[name] = part.view(dtype).view(entry["shape"])
    return StoredObject(header, tensors)


_READ_PIECE = 4 << 20
# Object buffers start on, and span whole, blocks of this many bytes, so that O_DIRECT
# reads (which need block-aligned addresses, offsets and lengths) can land in them.
BUFFER_ALIGN = 4096
# From this size a buffer is its own anonymous mapping in transparent huge pages; smaller
# ones come from the heap, whose allocator recycles memory that is already faulted in.
_HUGE_BUFFER_MIN = 4 << 20
_HUGE_PAGE = 2 << 20


def object_buffer(size: int, *, huge_pages: bool = True) -> memoryview:
    """Uninitialised, writable memory for a container of ``size`` bytes, to read it into.

    The view starts at a ``BUFFER_ALIGN`` boundary and is ``size`` rounded up to a
    multiple of it (slice ``[:size]`` for the object). The memory lives as long as anything
    views it, e.g. the tensors ``decode_object`` builds on it.

    Large buffers (with ``huge_pages``) are a private anonymous mapping advised for
    transparent huge pages: a fresh 32 MiB buffer faulted in 4 KiB page by page took
    25-60 ms on a 2-vCPU VM -- as long as reading the blob from its disk -- and 7 ms in
    2 MiB pages. (glibc would map a fresh block for it anyway: it serves every allocation
    above 32 MiB by ``mmap``.)
    """
    cap = -(-size // BUFFER_ALIGN) * BUFFER_ALIGN
    if not huge_pages or cap < _HUGE_BUFFER_MIN or not hasattr(mmap, "MAP_ANONYMOUS"):
        import torch

        raw = torch.empty(cap + BUFFER_ALIGN, dtype=torch.uint8)
        skip = -raw.data_ptr() % BUFFER_ALIGN
        return raw.numpy().data[skip : skip + cap]
    # A length of whole huge pages makes recent kernels align the mapping to one; the
    # pages past ``cap`` are never touched, so they cost address space, not memory. The
    # last, partial huge page stays in small pages: a huge page there would be mostly waste.
    length = -(-cap // _HUGE_PAGE) * _HUGE_PAGE
    whole = cap // _HUGE_PAGE * _HUGE_PAGE
    m = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no THP here: small pages work
        m.madvise(mmap.MADV_HUGEPAGE, 0, whole)
        if whole < length:
            m.madvise(mmap.MADV_NOHUGEPAGE, whole, length - whole)
    return memoryview(m)[:cap]


class ContainerDigest:
    """The checksum of a container of ``size`` bytes whose bytes land in ``buf`` front to
    back: ``advance(n)`` says ``buf[:n]`` now holds the first ``n`` bytes and hashes what
    is new, so the checksum overlaps the reads still in flight instead of costing a second
    pass over the object; ``hexdigest()`` is what ``decode_object(digest=...)`` checks."""

    def __init__(self, buf: memoryview, size: int) -> None:
        self._buf = buf
        self._size = size
        self._h: Any = None
        self._hashed = 0

    def advance(self, filled: int) -> None:
        buf = self._buf
        if self._h is None:
            if filled < 8:
                return
            (hn,) = struct.unpack("<Q", buf[:8])
            if hn > _MAX_HEADER_BYTES or 8 + hn > self._size:
                raise CorruptObjectError(f"not a container (header length {hn})")
            if filled < 8 + hn:
                return
            self._h = xxhash.xxh3_128(buf[:8])
            self._h.update(_header_for_checksum(bytes(buf[8 : 8 + hn])))
            self._hashed = 8 + hn
        if filled > self._hashed:
            self._h.update(buf[self._hashed : filled])
            self._hashed = filled

    def hexdigest(self) -> str:
        if self._h is None or self._hashed != self._size:
            raise CorruptObjectError(f"object truncated: {self._hashed} of {self._size} bytes")
        digest: str = self._h.hexdigest()
        return digest


def read_object(
    readinto: Callable[[memoryview], int], size: int, *, huge_pages: bool = True
) -> StoredObject:
    """Read and decode a container of ``size`` bytes from a stream (e.g. a file).

    The stream is read in pieces into an ``object_buffer`` (uninitialised, owned by the
    returned tensors: no zero-fill pass; ``huge_pages`` as there) and each piece is hashed
    as soon as it lands, so the checksum overlaps the kernel's readahead of the next piece.
    Raises ``CorruptObjectError`` when the stream ends early or the bytes do not verify.
    """
    buf = object_buffer(size, huge_pages=huge_pages)[:size]
    digest = ContainerDigest(buf, size)
    got = 0
    while got < size:
        n = readinto(buf[got : min(size, got + _READ_PIECE)])
        if not n:
            raise CorruptObjectError(f"object truncated: {got} of {size} bytes")
        got += n
        digest.advance(got)
    return decode_object(buf, digest=digest.hexdigest())
