"""The ``raw`` codec stores a chunk in the order its memory has: canonical, or by token
(``"kv_by_token"``) for views of token-major memory such as SGLang's page_first pool.
Whatever it stored, every reader gets the same canonical chunk."""

from __future__ import annotations

import pytest
import torch

from kvcache.codecs.raw import BY_TOKEN, CANONICAL, RawCodec
from kvcache.kvstore.container import ObjectHeader, StoredObject, decode_object, encode_object
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.disk_tier import DiskTier
from kvcache.kvstore.errors import CorruptObjectError, LayoutMismatchError
from kvcache.kvstore.layout import AttentionKind, KVLayout
from kvcache.kvstore.tiered_store import TieredStore
from tests.helpers import make_key

MHA = KVLayout("m", num_layers=3, num_kv_heads=2, head_dim=8, dtype="bfloat16")
MLA = KVLayout("m", num_layers=3, num_kv_heads=1, head_dim=8, dtype="bfloat16",
               attention=AttentionKind.MLA, latent_dim=12)
TOKENS = 5


def token_major(layout: KVLayout, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(memory, chunk): K/V planes of tokens whose layers lie together (``[2, T, L, H, D]``,
    MLA ``[T, L, latent]``), as a page of a larger pool, and the canonical view of it."""
    g = torch.Generator().manual_seed(seed)
    L = layout.num_layers
    if layout.is_mla:
        assert layout.latent_dim is not None
        pool = torch.randn(2 * TOKENS, L, layout.latent_dim, generator=g).to(torch.bfloat16)
        memory = pool[TOKENS:]
        return memory, memory.transpose(0, 1)
    pool = torch.randn(2, 2 * TOKENS, L, layout.num_kv_heads, layout.head_dim,
                       generator=g).to(torch.bfloat16)
    memory = pool[:, TOKENS:]  # each plane contiguous, the planes apart
    return memory, memory.permute(2, 0, 1, 3, 4)


@pytest.mark.parametrize("layout", [MHA, MLA], ids=["mha", "mla"])
def test_token_major_chunks_are_stored_by_token_and_decode_canonical(layout):
    memory, chunk = token_major(layout)
    tensors, params = RawCodec().encode(chunk, layout)
    assert list(tensors) == [BY_TOKEN]
    stored = tensors[BY_TOKEN]
    assert stored.data_ptr() == memory.data_ptr() and torch.equal(stored, memory)
    got = RawCodec().decode(tensors, params, layout, TOKENS)
    assert got.shape == layout.chunk_shape(TOKENS) and torch.equal(got, chunk)
    assert torch.equal(RawCodec().decode_layer(tensors, params, layout, TOKENS, 2), chunk[2])


@pytest.mark.parametrize("layout", [MHA, MLA], ids=["mha", "mla"])
def test_other_chunks_are_stored_canonical(layout):
    _, chunk = token_major(layout)
    contiguous = chunk.contiguous()
    assert list(RawCodec().encode(contiguous, layout)[0]) == [CANONICAL]
    # A layer-major pool's page (layers apart, tokens together): not by token either.
    shape = list(contiguous.shape)
    shape[layout.token_dim] = 3 * TOKENS
    big = torch.zeros(shape, dtype=torch.bfloat16)
    page = big[:, TOKENS:2 * TOKENS] if layout.is_mla else big[:, :, TOKENS:2 * TOKENS]
    page.copy_(contiguous)
    tensors, _ = RawCodec().encode(page, layout)
    assert list(tensors) == [CANONICAL] and torch.equal(tensors[CANONICAL], contiguous)
    # An engine's own page format is stored as it comes.
    opaque = KVLayout("m", 3, 2, 8, dtype="bfloat16", page_format="engine-x")
    assert list(RawCodec().encode(token_major(MHA)[1], opaque)[0]) == [CANONICAL]


def test_objects_stored_by_token_survive_every_tier_and_transcoding(tmp_path):
    """CPU tier (raw, by token) -> disk (raw: the same object; zstd: transcoded) and back
    through the container: the chunk read is the chunk stored, bit for bit."""
    chunks = [token_major(MHA, seed=i)[1] for i in range(3)]
    for lower in ("raw", "zstd"):
        cpu = CpuTier(1 << 20)
        with TieredStore([cpu, DiskTier(tmp_path / lower, 1 << 24)],
                         codecs=["raw", lower]) as store:
            for i, c in enumerate(chunks):
                store.put(make_key(i), c, MHA)
            store.flush()
            assert list(cpu.get(make_key(0)).tensors) == [BY_TOKEN]
            for i, c in enumerate(chunks):
                cpu.delete(make_key(i))
                got = store.get(make_key(i))
                assert got is not None and torch.equal(got, c), lower
    obj = StoredObject(ObjectHeader(make_key(9), MHA, TOKENS),
                       RawCodec().encode(chunks[0], MHA)[0])
    back = decode_object(encode_object(obj))
    assert torch.equal(RawCodec().decode(back.tensors, {}, MHA, TOKENS), chunks[0])


def test_put_object_checks_by_token_objects(tmp_path):
    """What a daemon receives: a by-token object is taken; one of the wrong shape, or with
    a second tensor, is refused and stores nothing."""
    memory, chunk = token_major(MHA)
    with TieredStore([CpuTier(1 << 20)]) as store:
        good = StoredObject(ObjectHeader(make_key(1), MHA, TOKENS), {BY_TOKEN: memory})
        store.put_object(good)
        assert torch.equal(store.get(make_key(1)), chunk)
        bad = [
            StoredObject(ObjectHeader(make_key(2), MHA, TOKENS + 1), {BY_TOKEN: memory}),
            StoredObject(ObjectHeader(make_key(3), MHA, TOKENS),
                         {BY_TOKEN: memory, CANONICAL: chunk.contiguous()}),
            StoredObject(ObjectHeader(make_key(4), MHA, TOKENS), {BY_TOKEN: chunk}),
            StoredObject(ObjectHeader(make_key(5), MHA, 0), {BY_TOKEN: memory[:, :0]}),
        ]
        for obj in bad:
            with pytest.raises(LayoutMismatchError):
                store.put_object(obj)
            assert not store.contains(obj.header.key)


def test_a_by_token_tensor_of_the_wrong_shape_is_corrupt():
    memory, _ = token_major(MHA)
    with pytest.raises(CorruptObjectError, match=BY_TOKEN):
        RawCodec().decode({BY_TOKEN: memory[:, 1:]}, {}, MHA, TOKENS)
    with pytest.raises(CorruptObjectError):
        RawCodec().decode({BY_TOKEN: memory.float()}, {}, MHA, TOKENS)
