"""LMCache's CacheGen on our KV chunks, for ``kvcache bench codecs``' side-by-side rows.

Run with the interpreter of a separate virtualenv that has ``lmcache`` (0.5.6) installed,
never the project's (``tools/lmcache_venv.sh VENV`` builds one):
``VENV/bin/python tools/lmcache_cachegen_runner.py DIR``. It imports neither kvcache nor
anything outside that venv, and exchanges only safetensors and JSON with the bench (no
pickle crosses the process boundary).

Input ``DIR/in.st``: tensors ``chunk0 .. chunkN-1``, each ``[L, 2, T, H, D]`` (bf16/fp16),
the canonical chunk layout. Output ``DIR/out.st``: ``chunk<i>`` decoded, same shape and
dtype; ``DIR/out.json``: ``raw_bytes``, ``encoded_bytes`` (every tensor LMCache stores:
bitstreams, their per-(layer, channel) lengths, the per-(layer, channel) 16-bit CDFs and
the per-token maxima), ``serialized_bytes`` (what LMCache writes: its pickle of those),
``cdf_bytes``, ``encode_s``, ``decode_s`` (best of ``--repeat`` per chunk, summed) and
``note``.

Entry points (LMCache 0.5.6): ``lmcache.storage_backend.serde.cachegen_encoder
.encode_function`` and, as its ``CacheGenDeserializer.from_bytes`` does,
``cachegen_decoder.decode_function_gpu`` + ``do_dequantize``. Without CUDA their kernels
resolve (``lmcache.device_ops``) to the numba CPU kernels of
``lmcache.v1.platform.torch_ops.cachegen_kernels``; 0.5.6 has no
``lmcache.non_cuda_equivalents``. Bins per layer follow
``CacheGenConfig.from_model_name``'s rule for a model it does not list (it would read the
layer count from the HF config): under 10 layers, 32 bins everywhere; else K 32 bins for
layers 0-9 and 16 after, V 32 for layers 0-1 and 16 after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _bins(num_layers: int) -> tuple[list[int], list[int]]:
    if num_layers < 10:
        return [32] * num_layers, [32] * num_layers
    k = [32 if i < 10 else 16 for i in range(num_layers)]
    v = [32 if i < 2 else 16 for i in range(num_layers)]
    return k, v


def _stub_transformers() -> None:
    """LMCache's CacheGen modules import ``transformers.AutoConfig`` only to look a model
    name up, which this script never does; a venv without transformers gets a stub."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        import types

        class AutoConfig:
            @staticmethod
            def from_pretrained(name: str) -> None:
                raise RuntimeError("transformers is not installed in the LMCache venv")

        mod = types.ModuleType("transformers")
        mod.AutoConfig = AutoConfig  # type: ignore[attr-defined]
        sys.modules["transformers"] = mod


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    _stub_transformers()
    from lmcache.storage_backend.serde.cachegen_basics import (
        CacheGenConfig,
        CacheGenGPUEncoderOutput,
        QuantizationSpec,
    )
    from lmcache.storage_backend.serde.cachegen_decoder import (
        decode_function_gpu,
        do_dequantize,
    )
    from lmcache.storage_backend.serde.cachegen_encoder import encode_function

    torch.set_num_threads(1)  # as the bench does for our codecs
    chunks = load_file(str(args.dir / "in.st"))
    names = sorted(chunks, key=lambda n: int(n.removeprefix("chunk")))

    def encode(kv: torch.Tensor) -> bytes:
        L = kv.shape[0]
        kb, vb = _bins(L)
        config = CacheGenConfig(
            nlayers=L,
            kspecs=[QuantizationSpec(i, i + 1, b) for i, b in enumerate(kb)],
            vspecs=[QuantizationSpec(i, i + 1, b) for i, b in enumerate(vb)],
        )
        out = encode_function(kv, config, torch.tensor(kb, dtype=torch.float32),
                              torch.tensor(vb, dtype=torch.float32), kv.shape[2])
        return out.to_bytes()

    def decode(blob: bytes, dtype: torch.dtype) -> torch.Tensor:
        enc = CacheGenGPUEncoderOutput.from_bytes(blob)
        T = enc.max_tensors_key.shape[1]
        L = enc.max_tensors_key.shape[0]
        kb, vb = _bins(L)
        buf = torch.zeros((T, 2 * L * enc.cdf.shape[1]), dtype=torch.uint8)
        key, value = decode_function_gpu(enc.cdf, enc.data_chunks, L, T, buf)
        key = do_dequantize(key, torch.tensor(kb, dtype=torch.float32), enc.max_tensors_key)
        value = do_dequantize(value, torch.tensor(vb, dtype=torch.float32),
                              enc.max_tensors_value)
        blob5 = torch.stack([key, value]).reshape(2, L, T, enc.num_heads, enc.head_size)
        return blob5.permute(1, 0, 2, 3, 4).to(dtype).contiguous()

    # numba compiles (or loads its cache) on first use: keep that out of the timings
    first = chunks[names[0]]
    decode(encode(first[:, :, :16].contiguous()), first.dtype)

    info: dict[str, Any] = {"raw_bytes": 0, "encoded_bytes": 0, "serialized_bytes": 0,
                            "cdf_bytes": 0, "encode_s": 0.0, "decode_s": 0.0}
    decoded: dict[str, torch.Tensor] = {}
    for name in names:
        kv = chunks[name].contiguous()
        best_e = best_d = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            blob = encode(kv)
            best_e = min(best_e, time.perf_counter() - t)
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = decode(blob, kv.dtype)
            best_d = min(best_d, time.perf_counter() - t)
        enc = CacheGenGPUEncoderOutput.from_bytes(blob)
        tensors = [enc.cdf, enc.max_tensors_key, enc.max_tensors_value]
        for dc in enc.data_chunks:
            tensors += [dc.bytestream, dc.bytestream_lengths]
        info["raw_bytes"] += _nbytes(kv)
        info["encoded_bytes"] += sum(_nbytes(t) for t in tensors)
        info["serialized_bytes"] += len(blob)
        info["cdf_bytes"] += _nbytes(enc.cdf)
        info["encode_s"] += best_e
        info["decode_s"] += best_d
        decoded[name] = out
    import lmcache

    kernels = type(getattr(lmcache, "device_ops", None)).__name__
    info["note"] = (
        f"LMCache {getattr(lmcache, '__version__', '?')} CacheGen via {kernels} "
        "(numba arithmetic coder, one (layer, channel) stream per task); encoded bytes = "
        f"bitstreams + lengths + CDFs ({info['cdf_bytes'] / info['raw_bytes']:.1%} of raw) "
        "+ per-token maxima; its pickled object is "
        f"{info['serialized_bytes'] / max(1, info['encoded_bytes']):.3f}x that"
    )
    save_file(decoded, str(args.dir / "out.st"))
    (args.dir / "out.json").write_text(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
