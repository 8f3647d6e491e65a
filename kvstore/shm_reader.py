"""The client side of the daemon's same-node fast path (``tools/server/fast_path.py``).

It maps the daemon's CPU pool read-only (the memfd arrives with the greeting) and reads
an object with one memcpy from the mapping into a buffer of its own, under a loan the
daemon holds until the copy is done; the release is sent without waiting for an answer.
The daemon takes back loans older than ``loan_ttl``, so a copy that finished later than
half of that after it was asked for is dropped (a miss): its bytes may have been reused.
What is checked: the key in the header, and that every tensor lies inside the pool. No
checksum: these bytes crossed no disk and no network (the daemon's memory, shared
read-only).
"""

from __future__ import annotations

import mmap
import os
import socket
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from kvcache.kvstore import wire
from kvcache.kvstore.container import ObjectHeader, StoredObject
from kvcache.kvstore.errors import CorruptObjectError
from kvcache.kvstore.fail_open import Deadline
from kvcache.kvstore.tier import check_object_key

_DTYPES = {name: getattr(torch, name) for name in (
    "float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64",
    "float8_e4m3fn", "float8_e5m2", "bool")}


_HEADER_CACHE = 1 << 16


class SharedMemoryReader:
    """One connection to a daemon's fast path. Thread-safe (requests are serialised)."""

    def __init__(self, path: str, *, timeout_s: float, token: str | None = None,
                 tenant: str = "default") -> None:
        self.path, self.token, self.tenant = path, token, tenant
        self._lock = threading.Lock()
        self.corrupt = 0  # objects whose description failed the checks
        # (key, created_at) -> (the header as received, parsed): parsing is most of a hit
        self._headers: OrderedDict[tuple[Any, Any], tuple[Any, ObjectHeader]] = OrderedDict()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(path)
            msg, fds, _, _ = socket.recv_fds(self._sock, 4096, 1)
            if len(fds) != 1:
                raise wire.ProtocolError("the fast path's greeting carried no memory")
            hello = self._parse(msg)
            self.pool_bytes = int(hello["pool_bytes"])
            self.loan_ttl_s = float(hello["loan_ttl"])
            try:
                self._map = mmap.mmap(fds[0], self.pool_bytes, prot=mmap.PROT_READ)
            finally:
                os.close(fds[0])  # the mapping keeps the memory
        except BaseException:
            self._sock.close()
            raise
        with warnings.catch_warnings():  # read-only on purpose: we never write through it
            warnings.simplefilter("ignore", UserWarning)
            self._pool = torch.frombuffer(self._map, dtype=torch.uint8)

    @staticmethod
    def _parse(data: bytes) -> dict[str, Any]:
        if len(data) < wire.MESSAGE_HEADER.size:
            raise wire.ProtocolError("truncated fast-path message")
        (n,) = wire.MESSAGE_HEADER.unpack(data[: wire.MESSAGE_HEADER.size])
        return wire.unpack_map(data[wire.MESSAGE_HEADER.size : wire.MESSAGE_HEADER.size + n])

    def _recv_exact(self, n: int, dl: Deadline) -> bytes:
        out = bytearray()
        while len(out) < n:
            self._sock.settimeout(dl.remaining())
            piece = self._sock.recv(n - len(out))
            if not piece:
                raise ConnectionResetError("the daemon closed the fast path")
            out += piece
        return bytes(out)

    def _ask(self, body: dict[str, Any], dl: Deadline) -> dict[str, Any]:
        self._sock.settimeout(dl.remaining())
        self._sock.sendall(wire.message(body))
        (n,) = wire.MESSAGE_HEADER.unpack(self._recv_exact(wire.MESSAGE_HEADER.size, dl))
        if n > wire.MAX_METADATA_BYTES:
            raise wire.ProtocolError("fast-path reply is too large")
        reply = wire.unpack_map(self._recv_exact(n, dl))
        if "error" in reply:
            raise wire.ProtocolError(f"fast path: {reply.get('message', reply['error'])}")
        return reply

    def get_objects(self, keys: Sequence[str], dl: Deadline) -> list[StoredObject | None]:
        """The objects under ``keys`` (None: a miss). Transport errors raise ``OSError`` /
        ``ProtocolError``; the caller falls back to HTTP."""
        body: dict[str, Any] = {"op": "get", "keys": list(keys), "tenant": self.tenant}
        if self.token:
            body["token"] = self.token
        with self._lock:
            asked = time.monotonic()
            reply = self._ask(body, dl)
            described = reply.get("objects")
            if not isinstance(described, list) or len(described) != len(keys):
                raise wire.ProtocolError("fast path: malformed reply")
            out: list[StoredObject | None] = []
            try:
                for key, d in zip(keys, described, strict=True):
                    try:
                        out.append(None if d is None else self._copy(key, d))
                    except CorruptObjectError:
                        self.corrupt += 1
                        out.append(None)
            finally:
                copied = time.monotonic()
                self._sock.settimeout(dl.remaining())
                self._sock.sendall(wire.message({"op": "release", "loan": reply.get("loan")}))
        if copied - asked > self.loan_ttl_s / 2 and any(o is not None for o in out):
            return [None] * len(keys)  # the loan may have run out mid-copy: nothing is safe
        return out

    def _header(self, d: Any) -> ObjectHeader:
        cache_key = (d.get("key"), d.get("created_at")) if isinstance(d, dict) else None
        hit = self._headers.get(cache_key) if cache_key else None
        if hit is not None and hit[0] == d:
            return hit[1]
        header = ObjectHeader.from_json(d)
        if cache_key:
            self._headers[cache_key] = (d, header)
            if len(self._headers) > _HEADER_CACHE:
                self._headers.popitem(last=False)
        return header

    def _copy(self, key: str, d: dict[str, Any]) -> StoredObject:
        try:
            header = self._header(d["header"])
            check_object_key(key, header)
            offset, size = int(d["offset"]), int(d["size"])
            if not (offset >= 0 and size >= 0 and offset + size <= self.pool_bytes):
                raise CorruptObjectError(f"{key} lies outside the shared pool")
            buf = self._pool[offset : offset + size].clone()  # the one copy
            tensors = {}
            for name, dtype, shape, rel, nbytes in d["slots"]:
                if not (rel >= 0 and rel + nbytes <= size) or dtype not in _DTYPES:
                    raise CorruptObjectError(f"{key}: tensor {name!r} is not where it says")
                tensors[name] = buf[rel : rel + nbytes].view(_DTYPES[dtype]).view(shape)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise wire.ProtocolError(f"fast path: bad description of {key}: {e}") from None
        return StoredObject(header, tensors)

    def close(self) -> None:
        self._sock.close()
