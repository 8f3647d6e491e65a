"""The fixed fidelity evaluation set, built deterministically from the held-out files.

Two kinds of prompts, each a context made of chunks plus a continuation:

- **prefix**: one contiguous piece of a held-out file: ``<bos>`` + ``PREFIX_CONTEXT - 1``
  bytes as a single chunk, then the next ``PREFIX_CONTINUATION`` bytes. The setting of
  plain prefix reuse and of codecs (lossy KV of the same positions).
- **rag**: ``RAG_CHUNKS`` pieces of *different* held-out files (so no chunk is a prefix of
  another), the first led by ``<bos>``, the others by ``<sep>``, ``RAG_CHUNK_BYTES`` bytes
  each and starting at a line. The continuation is ``<sep>``, then the last
  ``RAG_QUOTE_BYTES`` bytes of one earlier chunk (chosen so it lies more than 256 tokens
  back), then the ``RAG_FOLLOW_BYTES`` bytes that follow that chunk in its file: the quoted
  document, resumed where its chunk ended. Predicting it needs attention *across* chunks —
  what blending must recover and full reuse (chunks computed apart) loses.

Everything is drawn with ``random.Random(EVALSET_SEED)`` over the sorted held-out list, so
a given corpus always gives the same set; ``evalset_hash`` names it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from kvcache.tools.refmodel.corpus import Corpus, load_corpus
from kvcache.tools.refmodel.tokenizer import BOS_ID, SEP_ID

EVALSET_SEED = 1234
PREFIX_PROMPTS = 12
PREFIX_CONTEXT = 768
PREFIX_CONTINUATION = 192
RAG_PROMPTS = 12
RAG_CHUNKS = 4
RAG_CHUNK_BYTES = 200
RAG_QUOTE_BYTES = 48
RAG_FOLLOW_BYTES = 128
QUICK_PER_KIND = 2


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt: ``chunks`` (token ids, concatenated they are the context) + continuation.

    ``boundaries[i]`` is the context position where chunk ``i`` starts; ``sources`` names
    each chunk's file and byte offset.
    """

    name: str
    kind: str  # "prefix" or "rag"
    chunks: tuple[tuple[int, ...], ...]
    continuation: tuple[int, ...]
    sources: tuple[str, ...]

    @property
    def context(self) -> list[int]:
        return [t for c in self.chunks for t in c]

    @property
    def boundaries(self) -> list[int]:
        out, pos = [], 0
        for c in self.chunks:
            out.append(pos)
            pos += len(c)
        return out

    def chunk_tensors(self) -> list[torch.Tensor]:
        """Each chunk as ``[n_i]`` int64."""
        return [torch.tensor(c, dtype=torch.long) for c in self.chunks]

    def context_tensor(self) -> torch.Tensor:
        """``[T]`` int64."""
        return torch.tensor(self.context, dtype=torch.long)

    def continuation_tensor(self) -> torch.Tensor:
        """``[C]`` int64."""
        return torch.tensor(self.continuation, dtype=torch.long)


def _line_start(data: bytes, pos: int) -> int:
    """The start of the first line at or after ``pos`` (or ``pos`` if there is none)."""
    if pos == 0:
        return 0
    nl = data.find(b"\n", pos - 1)
    return pos if nl < 0 else nl + 1


def build_evalset(corpus: Corpus | None = None, *, quick: bool = False) -> list[EvalPrompt]:
    """The evaluation prompts; ``quick``: the first ``QUICK_PER_KIND`` of each kind."""
    corpus = load_corpus() if corpus is None else corpus
    rng = random.Random(EVALSET_SEED)
    texts = {f.rel: corpus.read(f) for f in corpus.heldout}
    prompts: list[EvalPrompt] = []

    long_enough = [r for r, d in texts.items() if len(d) >= PREFIX_CONTEXT + PREFIX_CONTINUATION]
    for i in range(PREFIX_PROMPTS):
        rel = long_enough[i % len(long_enough)] if i < len(long_enough) else rng.choice(long_enough)
        data = texts[rel]
        room = len(data) - (PREFIX_CONTEXT - 1) - PREFIX_CONTINUATION
        start = _line_start(data, rng.randrange(room + 1))
        start = min(start, room)
        ctx = data[start : start + PREFIX_CONTEXT - 1]
        cont = data[start + PREFIX_CONTEXT - 1 : start + PREFIX_CONTEXT - 1 + PREFIX_CONTINUATION]
        prompts.append(
            EvalPrompt(
                name=f"prefix-{i:02d}",
                kind="prefix",
                chunks=((BOS_ID, *ctx),),
                continuation=tuple(cont),
                sources=(f"{rel}@{start}",),
            )
        )

    need = RAG_CHUNK_BYTES + RAG_FOLLOW_BYTES
    usable = sorted(r for r, d in texts.items() if len(d) >= need + 1)
    for i in range(RAG_PROMPTS):
        rels = rng.sample(usable, RAG_CHUNKS)
        chunks: list[tuple[int, ...]] = []
        sources: list[str] = []
        follows: list[bytes] = []
        for j, rel in enumerate(rels):
            data = texts[rel]
            room = len(data) - need
            start = min(_line_start(data, rng.randrange(room + 1)), room)
            body = data[start : start + RAG_CHUNK_BYTES]
            follows.append(data[start + RAG_CHUNK_BYTES : start + need])
            chunks.append(((BOS_ID if j == 0 else SEP_ID), *body))
            sources.append(f"{rel}@{start}")
        # Quote a chunk that starts more than 256 tokens before the continuation.
        src = rng.randrange(RAG_CHUNKS - 2)
        quote = bytes(chunks[src][-RAG_QUOTE_BYTES:])
        cont = (SEP_ID, *quote, *follows[src])
        prompts.append(
            EvalPrompt(
                name=f"rag-{i:02d}",
                kind="rag",
                chunks=tuple(chunks),
                continuation=cont,
                sources=tuple(sources),
            )
        )
    if quick:
        by_kind: dict[str, list[EvalPrompt]] = {}
        for p in prompts:
            by_kind.setdefault(p.kind, []).append(p)
        prompts = [p for ps in by_kind.values() for p in ps[:QUICK_PER_KIND]]
    return prompts


def evalset_hash(prompts: Sequence[EvalPrompt]) -> str:
    blob = json.dumps([asdict(p) for p in prompts], sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()
