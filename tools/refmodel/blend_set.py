"""Blending's evaluation prompts: RAG-shaped, and built so that reusing segments computed
apart costs something measurable.

On ordinary prompts the reference model barely needs one chunk's KV to have seen the
chunks before it (chunks prefilled apart: KL 0.004, top-1 0.98 — docs/reference-model.md),
so every blending strategy would look alike. What it does need is its copy circuit: a
position's key encodes the three tokens before it, and the model copies a quoted text by
finding those keys. Here that crosses segments:

- a prompt holds ``FILES_PER_PROMPT`` documents, each as two consecutive *passages* of
  ``PASSAGE_BYTES`` (retrieval cuts documents into passages, and neighbours are retrieved
  together), each passage its own segment; the first passage of each document is led by
  ``<sep>``; the documents come in shuffled order after ``<bos>`` and a preamble line;
- the continuation is ``<sep>`` and then, for each document in another shuffled order,
  the ``QUOTE_BYTES`` before and after its passage boundary, and a newline. Continuing a
  quote past the boundary needs the keys of the second passage's first tokens, which
  encode the end of the first passage only if that passage computed them with the first
  one in view: with each passage prefilled alone, they encode nothing of it.

So full reuse loses predictions at a few positions per quote, and a strategy that
recomputes the right tokens (the second passages' first ones) recovers them. The quote
length was chosen on the tune split (16 prompts, full reuse against full prefill): 24
bytes each side gave a loss gap of +2.3% (KL 0.011, top-1 0.965), 8 bytes +3.9% (KL
0.023, top-1 0.945), 4 bytes +4.8% (KL 0.045, top-1 0.920); 8 keeps quotes long enough to
be quotes.

Text: the fidelity set's files (``fidelity_set.py``: three domains the model never saw),
split as there — ``tune`` files (where blending's parameters are chosen) never appear in
``eval`` prompts (where figures are reported). A prompt's documents come from windows of
different files, drawn with a fixed seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvcache.tools.refmodel.fidelity_set import load_fidelity_set
from kvcache.tools.refmodel.tokenizer import BOS_ID, SEP_ID

FILES_PER_PROMPT = 3
PASSAGE_BYTES = 128
QUOTE_BYTES = 8
PREAMBLE = b"Answer from the documents below.\n"
BLEND_SET_SEED = 4242
QUICK_PROMPTS = 2


@dataclass(frozen=True)
class BlendPrompt:
    """``context`` (token ids) with its ``segments`` (``(start, end)``, the passages) and a
    ``continuation`` to score; ``sources`` names each document's window."""

    context: tuple[int, ...]
    segments: tuple[tuple[int, int], ...]
    continuation: tuple[int, ...]
    sources: tuple[str, ...]


def build_blend_prompts(split: str = "eval", *, quick: bool = False) -> list[BlendPrompt]:
    """The prompts of ``split`` (module docstring); ``quick``: ``QUICK_PROMPTS`` of them."""
    windows = list(load_fidelity_set(split).windows)
    rng = random.Random(BLEND_SET_SEED)
    rng.shuffle(windows)
    # Documents of one prompt come from different files: deal windows out file by file.
    by_file: dict[str, list] = {}
    for w in windows:
        by_file.setdefault(w.source.split("@")[0], []).append(w)
    files = sorted(by_file)
    rng.shuffle(files)
    queue = [w for i in range(max(len(v) for v in by_file.values()))
             for f in files if i < len(by_file[f]) for w in [by_file[f][i]]]
    prompts = []
    for i in range(len(queue) // FILES_PER_PROMPT):
        docs = queue[i * FILES_PER_PROMPT : (i + 1) * FILES_PER_PROMPT]
        prompts.append(_prompt(docs, rng))
        if quick and len(prompts) == QUICK_PROMPTS:
            break
    return prompts


def _prompt(docs: list, rng: random.Random) -> BlendPrompt:
    context = [BOS_ID, *PREAMBLE]
    segments, boundaries, sources = [], [], []
    for w in docs:
        text = bytes(w.context[1:]) + bytes(w.continuation)
        first, second = text[:PASSAGE_BYTES], text[PASSAGE_BYTES : 2 * PASSAGE_BYTES]
        segments.append((len(context), len(context) + 1 + len(first)))
        context += [SEP_ID, *first]
        segments.append((len(context), len(context) + len(second)))
        context += list(second)
        boundaries.append((first[-QUOTE_BYTES:], second[:QUOTE_BYTES]))
        sources.append(w.source)
    continuation = [SEP_ID]
    for before, after in rng.sample(boundaries, len(boundaries)):
        continuation += [*before, *after, ord("\n")]
    return BlendPrompt(tuple(context), tuple(segments), tuple(continuation), tuple(sources))
