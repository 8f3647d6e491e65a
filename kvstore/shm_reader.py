"""The client side of the daemon's same-node fast path (``tools/server/fast_path.py``).

It maps the daemon's CPU pool and the pool's index read-only (both memfds arrive with
the greeting) and reads an object with one memcpy from the mapping into a buffer of its
own: through the index without asking when it holds the key (``kvstore/shm_index.py``
says why that is safe), else under a loan the daemon holds until the copy is done (the
release is sent without waiting for an answer); lookups ask the index first too
(``exists``). The daemon takes back loans older than ``loan_ttl``, so a copy that
finished later than half of that after it was asked for is dropped (a miss): its bytes
may have been reused. What is checked: the key in the header, and that every tensor
lies inside the pool. No checksum: these bytes crossed no disk and no network (the
daemon's memory, shared read-only).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import socket
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import msgpack
import torch

from kvcache.kvstore import wire
from kvcache.kvstore.container import ObjectHeader, StoredObject
from kvcache.kvstore.errors import CorruptObjectError
from kvcache.kvstore.fail_open import Deadline
from kvcache.kvstore.shm_index import SharedIndex, lock_free_reads_supported
from kvcache.kvstore.tier import check_object_key

_DTYPES = {name: getattr(torch, name) for name in (
    "float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64",
    "float8_e4m3fn", "float8_e5m2", "bool")}


_HEADER_CACHE = 1 << 16
# Reads through the index are reported to the daemon in batches of this many keys, or
# this often: one message per get would cost the daemon a wakeup per read.
_TOUCH_BATCH = 256
_TOUCH_EVERY_S = 0.1


class SharedMemoryReader:
    """One connection to a daemon's fast path. Thread-safe (requests are serialised)."""

    def __init__(self, path: str, *, timeout_s: float, token: str | None = None,
                 tenant: str = "default") -> None:
        self.path, self.token, self.tenant = path, token, tenant
        self._lock = threading.Lock()  # the socket
        self._cache_lock = threading.Lock()  # the parsed-descriptor caches
        self.corrupt = 0  # objects whose description failed the checks
        self._descs: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._touched: list[str] = []
        self._touched_at = time.monotonic()
        # (key, created_at) -> (the header as received, parsed): parsing is most of a hit
        self._headers: OrderedDict[tuple[Any, Any], tuple[Any, ObjectHeader]] = OrderedDict()
        self._index: SharedIndex | None = None
        self.index_reads = 0  # objects read through the shared index (no round trip)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(path)
            self._sock.sendall(wire.message({"op": "hello", "token": token or "",
                                             "tenant": tenant}))
            msg, fds, _, _ = socket.recv_fds(self._sock, 4096, 2)
            try:
                hello = self._parse(msg)
                if fds and hello.get("version") != wire.FAST_PATH_VERSION:
                    raise wire.ProtocolError(
                        f"the daemon speaks fast-path version {hello.get('version')}, this "
                        f"client {wire.FAST_PATH_VERSION}: reading over HTTP")
                if not fds:
                    raise wire.ProtocolError(
                        f"the fast path refused: {hello.get('message', 'no memory sent')}")
                self.pool_bytes = int(hello["pool_bytes"])
                self.loan_ttl_s = float(hello["loan_ttl"])
                ttl = hello.get("ttl")
                self.ttl_s = None if ttl is None else float(ttl)
                self.pool_only = hello.get("pool_only") is True
                self._map = mmap.mmap(fds[0], self.pool_bytes, prot=mmap.PROT_READ)
                slots = int(hello.get("index_slots") or 0)
                if len(fds) == 2 and slots and lock_free_reads_supported():
                    self._index = SharedIndex.attach(os.dup(fds[1]), slots)
            finally:
                for fd in fds:
                    os.close(fd)  # the mappings keep the memory
        except BaseException:
            self._sock.close()
            raise
        # Says, without reading (a get may be reading), whether the daemon closed its end.
        self._closed_poll = select.poll()
        self._closed_poll.register(self._sock, select.POLLHUP)
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

    def exists(self, keys: Sequence[str]) -> list[bool | None]:
        """Whether the daemon holds each key, as far as the shared index says without
        asking: True (in the pool), False (not in the pool, which is all the daemon holds,
        and the index lacks none of its entries), None (ask the daemon). Like a lookup over
        HTTP it does not look at expiry: a get does. Raises ``OSError`` if the daemon left."""
        index = self._index
        if index is None:
            return [None] * len(keys)
        # A daemon that is gone leaves its memory mapped here: it must not answer.
        if self._closed_poll.poll(0):
            raise ConnectionResetError("the daemon closed the fast path")
        # Read before the keys: an entry left out meanwhile makes one answer a miss, no worse
        # than a lookup that came a moment earlier.
        absent = False if self.pool_only and index.unpublished() == 0 else None
        return [True if index.find(key) is not None else absent for key in keys]

    def get_objects(self, keys: Sequence[str], dl: Deadline) -> list[StoredObject | None]:
        """The objects under ``keys`` (None: a miss). Transport errors raise ``OSError`` /
        ``ProtocolError``; the caller falls back to HTTP."""
        out: list[StoredObject | None] = [None] * len(keys)
        read = []
        index = self._index
        if index is not None:  # lock-free: threads of one engine copy in parallel
            for i, key in enumerate(keys):
                out[i] = self._read_indexed(index, key)
                if out[i] is not None:
                    read.append(key)
        with self._lock:  # the socket: one conversation at a time
            rest = [i for i, o in enumerate(out) if o is None]
            if rest:
                for i, obj in zip(rest, self._get_on_loan([keys[i] for i in rest], dl),
                                  strict=True):
                    out[i] = obj
            if read:
                self.index_reads += len(read)
                self._touched += read
                if (len(self._touched) >= _TOUCH_BATCH
                        or time.monotonic() - self._touched_at >= _TOUCH_EVERY_S):
                    self._report_touched(dl.remaining())
        return out

    def _report_touched(self, timeout: float) -> None:
        """Tell the daemon which keys were read through the index (unanswered): it counts
        them, and its eviction policy sees them."""
        keys, self._touched = self._touched, []
        self._touched_at = time.monotonic()
        self._sock.settimeout(timeout)
        for at in range(0, len(keys), _TOUCH_BATCH):
            self._sock.sendall(wire.message({"op": "touched", "tenant": self.tenant,
                                             "keys": keys[at : at + _TOUCH_BATCH]}))

    def _read_indexed(self, index: SharedIndex, key: str) -> StoredObject | None:
        """``key`` read through the shared index, or None (not there, or changed while it
        was copied: the loan protocol then asks the daemon)."""
        found = index.find(key)
        if found is None:
            return None
        slot, seq, offset, size, desc_offset, desc_size = found
        if offset + size > self.pool_bytes or desc_offset + desc_size > self.pool_bytes:
            return None
        # The descriptor of a (slot, seq) never changes: parsed once.
        with self._cache_lock:
            d = self._descs.get((slot, seq))
        desc = None if d is not None else bytes(self._map[desc_offset : desc_offset + desc_size])
        buf = self._pool[offset : offset + size].clone()
        if not index.still(slot, seq):
            return None  # withdrawn or replaced meanwhile: these bytes may be another's
        try:
            if d is None:
                d = msgpack.unpackb(desc, raw=False)
                with self._cache_lock:
                    self._descs[(slot, seq)] = d
                    if len(self._descs) > _HEADER_CACHE:
                        self._descs.popitem(last=False)
            obj = self._build(key, d["header"], d["slots"], buf)
        except CorruptObjectError:
            self.corrupt += 1
            return None
        except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError,
                msgpack.StackError, wire.ProtocolError):
            return None
        if self.ttl_s is not None and time.time() - obj.header.created_at > self.ttl_s:
            return None  # expired: the daemon removes it when asked
        return obj

    def _get_on_loan(self, keys: Sequence[str], dl: Deadline) -> list[StoredObject | None]:
        body: dict[str, Any] = {"op": "get", "keys": list(keys), "tenant": self.tenant}
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
        with self._cache_lock:
            hit = self._headers.get(cache_key) if cache_key else None
        if hit is not None and hit[0] == d:
            return hit[1]
        header = ObjectHeader.from_json(d)
        if cache_key:
            with self._cache_lock:
                self._headers[cache_key] = (d, header)
                if len(self._headers) > _HEADER_CACHE:
                    self._headers.popitem(last=False)
        return header

    def _copy(self, key: str, d: dict[str, Any]) -> StoredObject:
        """A lent object copied out of the pool."""
        try:
            offset, size = int(d["offset"]), int(d["size"])
        except (KeyError, TypeError, ValueError) as e:
            raise wire.ProtocolError(f"fast path: bad description of {key}: {e}") from None
        if not (offset >= 0 and size >= 0 and offset + size <= self.pool_bytes):
            raise CorruptObjectError(f"{key} lies outside the shared pool")
        buf = self._pool[offset : offset + size].clone()  # the one copy
        return self._build(key, d.get("header"), d.get("slots"), buf)

    def _build(self, key: str, header_json: Any, slots: Any, buf: torch.Tensor) -> StoredObject:
        """The object whose bytes were copied into ``buf``, checked against its key and
        its own size."""
        try:
            header = self._header(header_json)
            check_object_key(key, header)
            tensors = {}
            for name, dtype, shape, rel, nbytes in slots:
                if not (rel >= 0 and rel + nbytes <= buf.numel()) or dtype not in _DTYPES:
                    raise CorruptObjectError(f"{key}: tensor {name!r} is not where it says")
                tensors[name] = buf[rel : rel + nbytes].view(_DTYPES[dtype]).view(shape)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise wire.ProtocolError(f"fast path: bad description of {key}: {e}") from None
        return StoredObject(header, tensors)

    def close(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            if self._touched:
                self._report_touched(1.0)
        self._sock.close()
        if self._index is not None:
            self._index.close()
            self._index = None
