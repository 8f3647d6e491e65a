"""The pipelined layer loader: same bytes as a plain ``get_many``, layer by layer, from any
tier; partial prefixes; RoPE shift on load; errors surface per layer, never as garbage."""

from __future__ import annotations

import pytest
import torch

from kvcache.codecs.base import Codec
from kvcache.kernels.rope_shift import rope_shift
from kvcache.kvstore import layer_loader
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.disk_tier import DiskTier
from kvcache.kvstore.layer_loader import LayerLoader, LayerLoadError
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.tiered_store import TieredStore
from tests.helpers import make_chunk, make_key

LAYOUT = KVLayout("loader-test", num_layers=3, num_kv_heads=2, head_dim=8, dtype="float16")
SIZES = [16, 16, 5]  # a partial last chunk
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def filled_store(tiers=None, layout=LAYOUT, sizes=SIZES):
    store = TieredStore(tiers or [CpuTier(1 << 22)])
    keys, chunks = [], []
    for i, n in enumerate(sizes):
        keys.append(make_key(i))
        chunks.append(make_chunk(layout, n, seed=i))
        store.put(keys[-1], chunks[-1], layout, rope_start=sum(sizes[:i]))
    return store, keys, torch.cat(chunks, dim=layout.token_dim)


def refs(store, key):
    return store.tiers[0]._entries[key].refs


@pytest.mark.parametrize("background", [True, False])
def test_layers_match_the_stored_chunks(background):
    store, keys, whole = filled_store()
    with LayerLoader(store, keys, LAYOUT, background=background) as loader:
        assert (loader.num_tokens, loader.num_chunks) == (37, 3)
        assert loader.tiers == ["cpu"] * 3
        for i in reversed(range(LAYOUT.num_layers)):  # any order
            got = loader.wait_for_layer(i)
            assert got.shape == (2, 37, 2, 8)
            assert torch.equal(got, whole[i])
        assert torch.equal(loader.wait_all(), whole)
    assert all(refs(store, k) == 0 for k in keys)  # borrows released


@pytest.mark.parametrize("codec", ["cachegen", "cachegen-rans", "zstd"])
def test_coded_chunks_decode_into_their_slices(codec):
    """Codecs write each chunk's layer into its tokens' slice of the output (cachegen
    straight into it): the same values as decoding the chunks whole."""
    store = TieredStore([CpuTier(1 << 22)], codecs=[codec])
    keys = [make_key(i) for i in range(len(SIZES))]
    for i, (k, n) in enumerate(zip(keys, SIZES, strict=True)):
        store.put(k, make_chunk(LAYOUT, n, seed=i), LAYOUT, rope_start=sum(SIZES[:i]))
    whole = torch.cat([store.get(k) for k in keys], dim=LAYOUT.token_dim)
    with LayerLoader(store, keys, LAYOUT) as loader:
        assert torch.equal(loader.wait_all(), whole)


def test_from_disk_and_promoted(tmp_path):
    disk = DiskTier(tmp_path / "d", 1 << 24)
    store, keys, whole = filled_store([CpuTier(1 << 22), disk])
    store.flush()
    store.tiers[0].delete(keys[1], force=True)
    with LayerLoader(store, keys, LAYOUT) as loader:
        assert loader.tiers == ["cpu", "disk", "cpu"]
        assert torch.equal(loader.wait_all(), whole)
    assert store.tiers[0].contains(keys[1])  # the disk hit was promoted
    store.close()


def test_missing_chunk_ends_a_partial_load_and_fails_a_full_one():
    store, keys, whole = filled_store()
    store.delete(keys[1], force=True)
    with LayerLoader(store, keys, LAYOUT, partial=True) as loader:
        assert loader.num_tokens == 16
        assert torch.equal(loader.wait_for_layer(2), whole[2][:, :16])
    with pytest.raises(LayerLoadError, match="missing"):
        LayerLoader(store, keys, LAYOUT)
    assert refs(store, keys[0]) == 0  # the failed constructor released its borrows
    with LayerLoader(store, [keys[1]], LAYOUT, partial=True) as loader:
        assert loader.num_tokens == 0 and loader.wait_for_layer(0).shape == (2, 0, 2, 8)


def test_another_layouts_chunk_is_never_loaded():
    store, keys, _ = filled_store()
    other = KVLayout("other-model", 3, 2, 8, dtype="float16")
    with pytest.raises(LayerLoadError, match=r"other-model|loader-test"):
        LayerLoader(store, keys, other)
    with LayerLoader(store, keys, other, partial=True) as loader:
        assert loader.num_tokens == 0


class _FailingCodec(Codec):
    """Raw decoding that fails from layer ``bad`` on, like a corrupt payload would."""

    name, lossless = "raw", True

    def __init__(self, inner: Codec, bad: int) -> None:
        self.inner, self.bad = inner, bad

    def encode(self, chunk, layout):
        return self.inner.encode(chunk, layout)

    def decode_layers(self, tensors, params, layout, num_tokens, layers):
        if layers.stop > self.bad:
            raise ValueError("bit rot")
        return self.inner.decode_layers(tensors, params, layout, num_tokens, layers)


@pytest.mark.parametrize("background", [True, False])
def test_a_failed_layer_is_an_error_for_it_and_every_later_one(monkeypatch, background):
    store, keys, whole = filled_store()
    real = layer_loader.get_codec
    monkeypatch.setattr(layer_loader, "get_codec", lambda n: _FailingCodec(real(n), bad=1))
    with LayerLoader(store, keys, LAYOUT, background=background) as loader:
        assert torch.equal(loader.wait_for_layer(0), whole[0])
        for i in (1, 2):
            with pytest.raises(LayerLoadError, match=r"loading layer 1 failed.*bit rot"):
                loader.wait_for_layer(i)
        assert torch.equal(loader.wait_for_layer(0), whole[0])  # earlier layers stay valid
    assert all(refs(store, k) == 0 for k in keys)


def test_close_cancels_and_later_layers_raise(monkeypatch):
    store, keys, whole = filled_store()
    gate = __import__("threading").Event()
    real = layer_loader.get_codec

    class _Slow(_FailingCodec):
        def decode_layer(self, tensors, params, layout, num_tokens, layer):
            if layer >= 1:
                gate.wait(5)
            return self.inner.decode_layer(tensors, params, layout, num_tokens, layer)

    monkeypatch.setattr(layer_loader, "get_codec", lambda n: _Slow(real(n), bad=99))
    loader = LayerLoader(store, keys, LAYOUT)
    assert torch.equal(loader.wait_for_layer(0), whole[0])
    with pytest.raises(LayerLoadError, match=r"after 0\.05 s"):
        loader.wait_for_layer(2, timeout_s=0.05)
    gate.set()
    loader.close()
    with pytest.raises(LayerLoadError, match="closed"):
        loader.wait_for_layer(2)
    assert all(refs(store, k) == 0 for k in keys)


def test_rope_shift_on_load():
    store, keys, whole = filled_store()
    with LayerLoader(store, keys, LAYOUT, rope_start=100) as loader:
        got = loader.wait_all()
    assert LAYOUT.rope is not None
    expected = rope_shift(whole[:, 0], 0, 100, LAYOUT.rope)  # stored at 0..36
    torch.testing.assert_close(got[:, 0], expected, atol=1e-3, rtol=1e-3)
    assert torch.equal(got[:, 1], whole[:, 1])


def test_mla_layers():
    mla = KVLayout("mla", 2, 1, 8, dtype="bfloat16", attention="mla", latent_dim=24)
    store, keys, whole = filled_store(layout=mla, sizes=[4, 3])
    with LayerLoader(store, keys, mla) as loader:
        assert loader.wait_for_layer(1).shape == (7, 24)
        assert torch.equal(loader.wait_all(), whole)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["cachegen-rans", "cachegen"])
def test_cuda_target_decodes_coded_chunks(codec):
    """cachegen-rans decodes on the GPU, into each chunk's slice; cachegen on the CPU."""
    store = TieredStore([CpuTier(1 << 22, pin_memory=True)], codecs=[codec])
    keys = [make_key(i) for i in range(len(SIZES))]
    for i, (k, n) in enumerate(zip(keys, SIZES, strict=True)):
        store.put(k, make_chunk(LAYOUT, n, seed=i), LAYOUT, rope_start=sum(SIZES[:i]))
    whole = torch.cat([store.get(k) for k in keys], dim=LAYOUT.token_dim)
    with LayerLoader(store, keys, LAYOUT, device="cuda") as loader:
        got = loader.wait_all().cpu()
    # the GPU's fp32 -> fp16 rounding and RoPE may differ from the CPU's by an ulp
    torch.testing.assert_close(got, whole, rtol=2 ** -9, atol=1e-3)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("background", [True, False])
def test_cuda_target(background):
    store = TieredStore([CpuTier(1 << 22, pin_memory=True)])
    keys = [make_key(i) for i in range(3)]
    chunks = [make_chunk(LAYOUT, n, seed=i) for i, n in enumerate(SIZES)]
    for k, c in zip(keys, chunks, strict=True):
        store.put(k, c, LAYOUT)
    with LayerLoader(store, keys, LAYOUT, device="cuda", background=background) as loader:
        layers = [loader.wait_for_layer(i).clone() for i in range(LAYOUT.num_layers)]
    torch.cuda.synchronize()
    assert torch.equal(torch.stack(layers).cpu(), torch.cat(chunks, dim=2))


def test_a_loader_made_in_inference_mode_writes_from_its_worker():
    """Grad modes are per thread; the output of an inference-mode caller is an inference
    tensor that the worker may only write in inference mode."""
    store, keys, whole = filled_store()
    with torch.inference_mode(), LayerLoader(store, keys, LAYOUT) as loader:
        assert torch.equal(loader.wait_all(), whole)


def test_hf_connector_recomputes_when_a_layer_fails(monkeypatch, caplog):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kvcache.connectors.hf import HFConnector

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    conn = HFConnector(model, TieredStore.in_memory(1 << 24), chunk_size=16, model_id="m")
    ids = list(range(3, 43))
    first = conn.prefill(ids)
    assert conn.prefill(ids).reused_tokens == 39  # through the layer loader (all but one)
    real = layer_loader.get_codec
    monkeypatch.setattr(layer_loader, "get_codec", lambda n: _FailingCodec(real(n), bad=1))
    res = conn.prefill(ids)
    assert res.reused_tokens == 0 and "recomputing it" in caplog.text
    torch.testing.assert_close(res.logits, first.logits, atol=1e-4, rtol=1e-4)


def test_chunks_on_disk_are_asked_of_the_cpu_tier_once(tmp_path):
    store, keys, whole = filled_store([CpuTier(1 << 22), DiskTier(tmp_path / "d", 1 << 22)])
    store.flush()
    for k in keys[1:]:  # leave only the first chunk in CPU memory
        store.tiers[0].delete(k)
    before = store.tiers[0].stats()
    with LayerLoader(store, keys, LAYOUT) as loader:
        assert torch.equal(loader.wait_all(), whole)
        assert loader.tiers == ["cpu", *["disk"] * (len(keys) - 1)]
    after = store.tiers[0].stats()
    assert after.misses - before.misses == len(keys) - 1
