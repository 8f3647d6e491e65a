"""Which parts of a prompt the store can supply when they are not its prefix: blend plans.

RAG and agent prompts put the same documents, tool outputs and memories in different
orders after different preambles, so their KV is never a prefix of anything stored.
Blending (CacheBlend) reuses each such *segment* wherever it appears. This module is the
engine-independent half: where the segments are, what the store holds of each, and why
what it does not hold is missing. Engines carry the plan out (``connectors/blend.py`` for
transformers; ``docs/architecture.md`` says how vLLM will).

Segments come from the caller — the spans a RAG app inserted, ``[start, end)`` in the
prompt — or from a separator token sequence (``segments_by_separator``: each occurrence
starts a segment). Tokens outside every segment (a preamble, the question) are computed.

Keys: a segment is keyed by its own tokens, not by what precedes it. It is cut into
chunks of ``chunk_size`` tokens from its own start; chunk ``j`` is named by the content
key of the segment's tokens up to its end (``segment_chunks``), so a hit on chunk ``j``
means the segment matches from its start through that chunk, whatever comes before the
segment in the prompt. A stored segment's keys were rotated (RoPE) at the positions it
had when it was prefilled (the object's ``rope_start``); loading it elsewhere rotates
them to the new positions (``LayerLoader(rope_start=...)``).

Why a segment, or its tail, is not reused (``MISS_*``): the store does not hold it; it
holds only its first chunks (the segment was stored with other boundaries, or differs
after them); it is shorter than ``min_tokens`` (not worth a lookup and a load); and, found
only when loading, it was stored for another layout, or failed to load (corrupt,
timed out).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvcache.kvstore.errors import KVCacheError
from kvcache.kvstore.keys import DEFAULT_CHUNK_SIZE, chunk_bounds, content_key

MISS_NOT_STORED = "not stored"
MISS_BOUNDARY = "boundary mismatch"
MISS_TOO_SHORT = "too short"
MISS_LAYOUT = "layout mismatch"
MISS_LOAD = "load failed"
MISS_REASONS = (MISS_NOT_STORED, MISS_BOUNDARY, MISS_TOO_SHORT, MISS_LAYOUT, MISS_LOAD)

# Segments shorter than this are computed: a lookup and a load cost more than they save.
DEFAULT_MIN_SEGMENT_TOKENS = 16


class SegmentError(KVCacheError, ValueError):
    """Segment boundaries that do not describe the prompt (overlapping, out of range)."""


@dataclass(frozen=True)
class SegmentChunk:
    """Chunk ``[start, end)`` of a segment, in the segment's own token offsets."""

    start: int
    end: int
    key: str

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def segment_chunks(fingerprint: str, tokens: Sequence[int],
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[SegmentChunk]:
    """A segment's chunks and their keys (module docstring). tokens: the segment's."""
    return [SegmentChunk(s, e, content_key(fingerprint, tokens[:e]))
            for s, e in chunk_bounds(len(tokens), chunk_size)]


def segments_by_separator(tokens: Sequence[int], separator: Sequence[int]
                          ) -> list[tuple[int, int]]:
    """``[start, end)`` of every segment of ``tokens`` that begins with ``separator`` and
    runs to the next occurrence (or the end). Tokens before the first are in none."""
    sep = list(separator)
    if not sep:
        raise SegmentError("the separator must be at least one token")
    toks = list(tokens)
    starts = [i for i in range(len(toks) - len(sep) + 1) if toks[i : i + len(sep)] == sep]
    # Overlapping occurrences (a separator like [7, 7] in 7 7 7) start one segment.
    kept: list[int] = []
    for s in starts:
        if not kept or s >= kept[-1] + len(sep):
            kept.append(s)
    return list(zip(kept, [*kept[1:], len(toks)][: len(kept)], strict=True))


def check_segments(segments: Sequence[tuple[int, int]], num_tokens: int
                   ) -> list[tuple[int, int]]:
    """The segments as sorted ``(start, end)`` ints, or ``SegmentError`` saying what is
    wrong with them: empty, out of ``[0, num_tokens]``, overlapping."""
    out: list[tuple[int, int]] = []
    for seg in segments:
        try:
            start, end = (int(x) for x in seg)
        except (TypeError, ValueError):
            raise SegmentError(f"a segment is a (start, end) pair of ints, got {seg!r}"
                               ) from None
        if not 0 <= start < end <= num_tokens:
            raise SegmentError(f"segment ({start}, {end}) is not a non-empty span of the "
                               f"{num_tokens}-token prompt")
        out.append((start, end))
    out.sort()
    for (_, a_end), (b_start, b_end) in itertools.pairwise(out):
        if b_start < a_end:
            raise SegmentError(f"segments overlap: one ends at {a_end}, the next spans "
                               f"({b_start}, {b_end})")
    return out


@dataclass(frozen=True)
class SegmentPlan:
    """One span of the prompt, ``[start, end)`` (target positions).

    chunks: the segment's chunks (empty for tokens outside every segment: computed);
    cached_tokens: how many of its first tokens come from the store (whole chunks);
    tier: where its first chunk is; reason: why it is not reused past ``cached_tokens``
    (None when it all is, or when it is not a segment); source_start: where the stored
    keys were rotated (known once loaded).
    """

    start: int
    end: int
    chunks: tuple[SegmentChunk, ...] = ()
    cached_tokens: int = 0
    tier: str | None = None
    reason: str | None = None
    source_start: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def is_segment(self) -> bool:
        return bool(self.chunks)

    @property
    def cached_keys(self) -> list[str]:
        """The keys of the chunks the store supplies."""
        out, n = [], 0
        for c in self.chunks:
            if n >= self.cached_tokens:
                break
            out.append(c.key)
            n += c.num_tokens
        return out

    @property
    def shift(self) -> int | None:
        """Positions the cached keys move by (target − source); None until loaded."""
        return None if self.source_start is None else self.start - self.source_start


@dataclass(frozen=True)
class BlendPlan:
    """A prompt of ``num_tokens`` tokens as consecutive spans (``SegmentPlan``)."""

    num_tokens: int
    spans: tuple[SegmentPlan, ...]

    @property
    def cached_tokens(self) -> int:
        return sum(s.cached_tokens for s in self.spans)

    def cached_mask(self) -> torch.Tensor:
        """bool ``[num_tokens]``: True where the KV comes from the store."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool)
        for s in self.spans:
            mask[s.start : s.start + s.cached_tokens] = True
        return mask

    def missed_tokens(self) -> dict[str, int]:
        """Segment tokens not reused, by reason."""
        out: dict[str, int] = {}
        for s in self.spans:
            if s.reason is not None:
                out[s.reason] = out.get(s.reason, 0) + s.num_tokens - s.cached_tokens
        return out

    def with_span(self, i: int, **changes: object) -> BlendPlan:
        """This plan with span ``i`` changed (what loading learns: source positions,
        chunks that failed)."""
        spans = list(self.spans)
        spans[i] = dataclasses.replace(spans[i], **changes)  # type: ignore[arg-type]
        return BlendPlan(self.num_tokens, tuple(spans))


def plan_all_cached(tokens: Sequence[int], segments: Sequence[tuple[int, int]], *,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, fingerprint: str = "00" * 16
                    ) -> BlendPlan:
    """The plan ``plan_blend`` gives when the store holds every segment whole: for callers
    that supply the segments' KV themselves (evaluations, tests)."""
    spans: list[SegmentPlan] = []
    at = 0
    for start, end in check_segments(segments, len(tokens)):
        if start > at:
            spans.append(SegmentPlan(at, start))
        chunks = tuple(segment_chunks(fingerprint, list(tokens[start:end]), chunk_size))
        spans.append(SegmentPlan(start, end, chunks, end - start))
        at = end
    if at < len(tokens):
        spans.append(SegmentPlan(at, len(tokens)))
    return BlendPlan(len(tokens), tuple(spans))


# How many leading keys a store holds (``TieredStore.longest_prefix``) and which tier
# holds a key (``TieredStore.where``).
Lookup = Callable[..., int]
Where = Callable[[str], str | None]


def plan_blend(lookup: Lookup, where: Where, fingerprint: str, tokens: Sequence[int],
               segments: Sequence[tuple[int, int]], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
               min_tokens: int = DEFAULT_MIN_SEGMENT_TOKENS) -> BlendPlan:
    """What the store holds of each segment of ``tokens`` (module docstring).

    lookup / where: the store's ``longest_prefix`` / ``where``; fingerprint: the engine's
    ``KVLayout.fingerprint``; segments: ``(start, end)`` spans (``check_segments``).
    """
    toks = list(tokens)
    spans: list[SegmentPlan] = []
    at = 0
    for start, end in check_segments(segments, len(toks)):
        if start > at:
            spans.append(SegmentPlan(at, start))
        chunks = tuple(segment_chunks(fingerprint, toks[start:end], chunk_size))
        if end - start < min_tokens:
            spans.append(SegmentPlan(start, end, chunks, reason=MISS_TOO_SHORT))
        else:
            found = lookup([c.key for c in chunks], num_tokens=[c.num_tokens for c in chunks])
            cached = sum(c.num_tokens for c in chunks[:found])
            reason = None if found == len(chunks) else \
                MISS_BOUNDARY if found else MISS_NOT_STORED
            tier = where(chunks[0].key) if found else None
            spans.append(SegmentPlan(start, end, chunks, cached, tier, reason))
        at = end
    if at < len(toks):
        spans.append(SegmentPlan(at, len(toks)))
    return BlendPlan(len(toks), tuple(spans))
