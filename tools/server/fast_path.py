"""The same-node fast path: clients read the daemon's CPU tier straight from shared memory.

HTTP costs a socket copy per byte (daemon → kernel → client) plus framing; a client on
the same node can instead map the CPU tier's pool (a memfd, ``CpuTier(shared=True)``)
read-only and copy an object out of it with one memcpy. The control channel is a Unix
socket beside the daemon's (``<socket>.fast``):

1. the client says ``{"op": "hello", "token"?}``; under ``read_auth = "token"`` a client
   without the token is refused and disconnected (the pool holds every tenant's KV);
   otherwise the daemon sends ``{"pool_bytes", "loan_ttl", "index_slots", "ttl",
   "version", "pool_only"}`` with the memfds of its pool and of the pool's lock-free index
   (``kvstore/shm_index.py``) attached. Keys the index holds are read without asking, and
   looked up without asking (also those it lacks, when the pool is all the daemon holds);
   their reads are reported afterwards, unanswered, as ``{"op": "touched", "keys"}`` so
   that eviction sees them. The rest go through loans:
2. ``{"op": "get", "keys", "token"?, "tenant"?}`` → ``{"loan", "objects"}``: per key,
   None or the object's header and where its tensors are in the pool. The entries are
   lent (never evicted or reused) until
3. ``{"op": "release", "loan"}``, unanswered (no round trip). A loan not returned within
   ``loan_ttl`` (the greeting says it: ``lease_ttl``) is taken back; a client that took
   longer than half of it from asking to having copied drops its copy, since the bytes
   may have been reused meanwhile. A client that disconnects returns all its loans.

Keys the CPU tier lacks but a lower tier holds are promoted first
(``TieredStore.lend``), so the fast path serves whatever the daemon holds. Only reads
take this path; writes go over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from kvcache.kvstore import wire
from kvcache.kvstore.cpu_tier import CpuTier, Loan, slot_rows
from kvcache.kvstore.errors import KVCacheError
from kvcache.kvstore.tiered_store import check_key
from kvcache.kvstore.tokens import token_matches
from kvcache.tools.server.app import CacheServer

log = logging.getLogger("kvcache.server")


_HEADER_CACHE = 1 << 16
_MAX_TOUCHED = 4096  # keys in one report of reads made through the index


class FastPath:
    """Serves ``cpu``'s pool, its index and loans of its entries on a Unix socket at
    ``path``."""

    def __init__(self, server: CacheServer, cpu: CpuTier, path: Path) -> None:
        if cpu.pool_fd is None:
            raise KVCacheError("the fast path needs a CPU tier built with shared=True")
        self.server, self.cpu, self.path = server, cpu, path
        self._loans: dict[str, tuple[list[Loan], float, str]] = {}  # id -> loans, expiry, conn
        self._listener: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        # (key, created_at) -> the header as sent: building it is most of a hit's work
        self._headers: OrderedDict[tuple[str, float], dict[str, Any]] = OrderedDict()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._listener = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o660)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            for writer in list(self._writers):  # ends each client's loop at its next read
                writer.close()
            await self._listener.wait_closed()
        for loan_id in list(self._loans):
            self._return(loan_id)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _describe(self, loan: Loan) -> dict[str, Any]:
        h = loan.header
        sent = self._headers.get((h.key, h.created_at))
        if sent is None:
            sent = self._headers[(h.key, h.created_at)] = h.to_json()
            if len(self._headers) > _HEADER_CACHE:
                self._headers.popitem(last=False)
        return {"header": sent, "offset": loan.offset, "size": loan.size,
                "slots": slot_rows(loan.slots)}

    def expire(self) -> int:
        """Take back loans older than the lease time (a client that took longer than half
        of it to copy drops its copy, see ``kvstore/shm_reader.py``)."""
        now = time.monotonic()
        dead = [i for i, (_, until, _) in self._loans.items() if until <= now]
        for loan_id in dead:
            self._return(loan_id)
        return len(dead)

    def _return(self, loan_id: str) -> bool:
        held = self._loans.pop(loan_id, None)
        if held is None:
            return False
        for loan in held[0]:
            self.cpu.release(loan)
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = secrets.token_hex(8)
        self._writers.add(writer)
        try:
            hello = await self._read_message(reader)
            if hello.get("op") != "hello":
                raise wire.ProtocolError("a client starts with a hello")
            if not self._may_read(hello):
                # The pool holds every tenant's KV: no memory for a client without the token.
                writer.write(wire.message({"error": "unauthorized",
                                           "message": "a valid token is required"}))
                await writer.drain()
                return
            self._send_pool(writer)
            while True:
                msg = await self._read_message(reader)
                try:
                    reply = await self._handle(msg, conn_id)
                except (KVCacheError, ValueError) as e:
                    # Only gets are answered: an answer to anything else would be read as
                    # the answer to the client's next get.
                    reply = ({"error": type(e).__name__, "message": str(e)}
                             if msg.get("op") == "get" else None)
                if reply is not None:
                    writer.write(wire.message(reply))
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, wire.ProtocolError):
            pass  # the client left (or spoke garbage): its loans come back below
        except asyncio.CancelledError:
            pass  # the daemon is stopping
        finally:
            self._writers.discard(writer)
            for loan_id in [i for i, (_, _, c) in self._loans.items() if c == conn_id]:
                self._return(loan_id)
            writer.close()

    @staticmethod
    async def _read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
        (n,) = wire.MESSAGE_HEADER.unpack(await reader.readexactly(wire.MESSAGE_HEADER.size))
        if n > wire.MAX_METADATA_BYTES:
            raise wire.ProtocolError(f"message of {n} bytes is over the limit")
        return wire.unpack_map(await reader.readexactly(n))

    def _may_read(self, hello: dict[str, Any]) -> bool:
        token = self.server.token
        if token is None or self.server.cfg.read_auth == "open":
            return True
        return token_matches(token, f"Bearer {hello.get('token', '')}")

    def _send_pool(self, writer: asyncio.StreamWriter) -> None:
        # asyncio's transport cannot send ancillary data: send the greeting and the memfd
        # on a duplicate of the connection's socket (a small message, it never blocks).
        fd = writer.get_extra_info("socket").fileno()
        with socket.socket(fileno=os.dup(fd)) as s:
            index = self.cpu.index
            hello = {"pool_bytes": self.cpu.capacity_bytes, "loan_ttl": self.server.cfg.lease_ttl,
                     "index_slots": 0 if index is None else index.slots,
                     "ttl": self.server.store.ttl_s, "version": wire.FAST_PATH_VERSION,
                     # nothing below the pool: a key its index lacks (while the index
                     # lacks no entry) is one the daemon does not hold
                     "pool_only": len(self.server.store.tiers) == 1}
            fds = [self.cpu.pool_fd] + ([] if index is None else [index.fd])
            socket.send_fds(s, [wire.message(hello)], fds)

    async def _handle(self, msg: dict[str, Any], conn_id: str) -> dict[str, Any] | None:
        op = msg.get("op")
        if op == "release":
            loan_id = msg.get("loan")
            if isinstance(loan_id, str):
                self._return(loan_id)
            return None
        if op == "touched":
            keys = wire.key_list(msg, limit=_MAX_TOUCHED)
            nbytes = self.cpu.touch(keys)
            c = self.server.store.counters
            c.reads += len(keys)
            c.read_hits += len(keys)
            self.server.tenants.read(str(msg.get("tenant", "default")), len(keys), 0, nbytes)
            return None
        if op != "get":
            raise wire.ProtocolError(f"unknown op {op!r}")
        cfg = self.server.cfg
        keys = wire.key_list(msg, limit=cfg.max_batch)
        for key in keys:
            check_key(key)
        loans = await self.server.lend(keys)
        loan_id = secrets.token_hex(16)
        held = [loan for loan in loans if loan is not None]
        if held:
            self._loans[loan_id] = (held, time.monotonic() + cfg.lease_ttl, conn_id)
        tenant = str(msg.get("tenant", "default"))
        self.server.tenants.read(tenant, len(held), len(keys) - len(held),
                                 sum(loan.size for loan in held))
        return {"loan": loan_id, "objects": [None if lo is None else self._describe(lo)
                                             for lo in loans]}
