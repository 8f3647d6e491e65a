"""Blob file reads: the O_DIRECT path for blobs not in the page cache, the buffered path
for cached or small ones, and the same checksum strictness on both."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from kvcache.kvstore import blob_files
from kvcache.kvstore.container import (
    BUFFER_ALIGN,
    ObjectHeader,
    StoredObject,
    encode_object,
    encode_parts,
    object_buffer,
)
from kvcache.kvstore.errors import CorruptObjectError
from kvcache.kvstore.layout import KVLayout
from kvcache.tools.cold_cache import evict
from tests.helpers import page_cached

MiB = 1 << 20
LAYOUT = KVLayout("test-model", 2, 2, 64, dtype="float16")


def _obj(payload: int, seed: int = 0) -> StoredObject:
    """An object whose container is ``payload`` bytes of tensor data plus its header."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (payload,), dtype=torch.uint8, generator=g)
    return StoredObject(ObjectHeader("ab" * 16, LAYOUT, 1), {"kv": data})


def _write(path: Path, data: bytes, cold: bool) -> Path:
    path.write_bytes(data)
    if cold:
        evict(path)
    return path


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    """A directory whose file system lets a file leave the page cache and takes O_DIRECT
    (not tmpfs, for one): where the cold path really runs."""
    probe = _write(tmp_path / "probe", b"x" * (5 * MiB), cold=True)
    if page_cached(probe):
        pytest.skip("this file system keeps files in the page cache (tmpfs?)")
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except (AttributeError, OSError):
        pytest.skip("this file system refuses O_DIRECT")
    probe.unlink()
    return tmp_path


# Sizes around the thresholds: below _DIRECT_MIN (read buffered even when cold), just
# above it, 1 MiB pieces and 4 MiB pieces, sizes that are not a multiple of the piece or
# of a block.
PAYLOADS = [1000, 2 * MiB, 4 * MiB - 4096, 4 * MiB + 123, 8 * MiB - 1024, 25 * MiB + 3]
LARGE = 5 * MiB + 5  # read with O_DIRECT when cold


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("cold", [True, False], ids=["cold", "warm"])
def test_round_trip(direct_dir: Path, payload: int, cold: bool):
    obj = _obj(payload)
    path = direct_dir / "blob.kvo"
    blob_files.write_blob_file(str(path), encode_parts(obj), sync=True)
    if cold:
        evict(path)
    back = blob_files.read_blob_file(str(path))
    assert back.header == obj.header
    assert torch.equal(back.tensors["kv"], obj.tensors["kv"])
    back.tensors["kv"].add_(1)  # the buffer belongs to the caller: writable


def test_cold_large_blob_bypasses_the_page_cache(direct_dir: Path):
    """The cold path reads with O_DIRECT (nothing lands in the page cache); a cached blob
    is read through the cache; a small one always is."""
    data = encode_object(_obj(LARGE))
    big = _write(direct_dir / "big.kvo", data, cold=True)
    blob_files.read_blob_file(str(big))
    assert not page_cached(big)

    below = blob_files._DIRECT_MIN - 4096
    small = _write(direct_dir / "small.kvo", encode_object(_obj(below)), cold=True)
    blob_files.read_blob_file(str(small))
    assert page_cached(small)

    warm = _write(direct_dir / "warm.kvo", data, cold=False)  # just written: cached
    assert page_cached(warm)
    blob_files.read_blob_file(str(warm))
    assert page_cached(warm)


def test_reads_that_overlap_others_go_through_the_page_cache(direct_dir: Path):
    """Only a lone read takes O_DIRECT: the reads of a batch (get_many) keep the disk busy
    together and take the plain path."""
    data = encode_object(_obj(LARGE))
    path = _write(direct_dir / "blob.kvo", data, cold=True)
    back = blob_files._read(str(path), alone=False)
    assert torch.equal(back.tensors["kv"], _obj(LARGE).tensors["kv"])
    assert page_cached(path)


def test_file_systems_without_o_direct_are_read_buffered(direct_dir: Path):
    data = encode_object(_obj(LARGE))
    path = _write(direct_dir / "blob.kvo", data, cold=True)
    dev = os.stat(path).st_dev
    blob_files._no_direct.add(dev)  # as after an EINVAL from this file system
    try:
        back = blob_files.read_blob_file(str(path))
        assert torch.equal(back.tensors["kv"], _obj(LARGE).tensors["kv"])
        assert page_cached(path)  # it went through the page cache
    finally:
        blob_files._no_direct.discard(dev)


@pytest.mark.parametrize("cold", [True, False], ids=["cold", "warm"])
@pytest.mark.parametrize("payload", [200_000, 5 * MiB + 7])
def test_truncated_file_is_corrupt(direct_dir: Path, payload: int, cold: bool):
    data = encode_object(_obj(payload))
    for keep in (len(data) - 1, len(data) - 4096 - 10, len(data) // 2, 100, 5, 0):
        path = _write(direct_dir / f"cut{keep}.kvo", data[:keep], cold=cold)
        with pytest.raises(CorruptObjectError):
            blob_files.read_blob_file(str(path))
    assert blob_files._reading == 0  # a failed read does not count as one in progress


@pytest.mark.parametrize("cold", [True, False], ids=["cold", "warm"])
def test_flipped_byte_is_corrupt(direct_dir: Path, cold: bool):
    data = encode_object(_obj(5 * MiB + 7))
    header_len = 8 + int.from_bytes(data[:8], "little")
    # In the length, the JSON header, the first piece, a piece boundary, the last byte.
    for pos in (3, header_len - 20, header_len + 1, MiB, 4 * MiB + 1, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        path = _write(direct_dir / f"flip{pos}.kvo", bytes(bad), cold=cold)
        with pytest.raises(CorruptObjectError):
            blob_files.read_blob_file(str(path))


def test_missing_file_raises_file_not_found(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        blob_files.read_blob_file(str(tmp_path / "gone.kvo"))


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4 * MiB - 1, 4 * MiB + 1, 9 * MiB])
def test_object_buffer_is_aligned_and_block_rounded(size: int):
    buf = object_buffer(size)
    assert len(buf) % BUFFER_ALIGN == 0 and size <= len(buf) < size + BUFFER_ALIGN
    t = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0)
    assert t.numel() == 0 or t.data_ptr() % BUFFER_ALIGN == 0
    if len(buf):
        t.fill_(7)  # writable, all of it
        assert int(t[-1]) == 7


def test_a_forked_child_reads_with_its_own_readers(direct_dir: Path):
    """The reader pool's threads do not survive a fork: a child makes its own (and does
    not wait forever on the parent's)."""
    path = _write(direct_dir / "blob.kvo", encode_object(_obj(LARGE)), cold=True)
    want = _obj(LARGE).tensors["kv"].numpy().tobytes()
    blob_files.read_blob_file(str(path))  # the parent's pool exists now
    evict(path)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the cold read round-trips
        code = 1
        try:  # compared as bytes: torch's own thread pool does not survive a fork
            back = blob_files.read_blob_file(str(path))
            code = 0 if back.tensors["kv"].numpy().tobytes() == want else 1
        finally:
            os._exit(code)
    for _ in range(600):  # a hang guard, not a timing: a healthy child is done at once
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's read never finished")
