"""``kvcache refmodel eval``: held-out bits per byte, a unigram baseline, and long-range figures.

Held-out text is cut into windows of ``SEQ_LEN`` tokens (each file starts with ``<bos>``;
at most ``MAX_WINDOWS_PER_FILE`` windows per file, so one long file cannot dominate). Every
byte target in a window is scored, and classified by the bytes before it *in the same
window*:

- **repeat**: the ``NGRAM``-byte string ending at the target (target included) occurred,
  ending more than ``REPEAT_DISTANCE`` tokens earlier — the model can get it right by
  copying from far back;
- **novel**: the ``NGRAM``-byte string just before the target never occurred earlier.

Tokens that are neither (short-range repeats, partial matches) count only in the total.
The unigram baseline is the cross-entropy of the held-out bytes under the training split's
byte frequencies (add-one smoothed).

The **copy probe** (``copy_probe``) asks directly whether the model copies from far back:
``PROBE_LETTERS`` random lowercase letters, held-out text, then the same letters again
``PROBE_DISTANCE`` tokens after the first copy began. Letters 2 onwards of each copy are
scored: the first copy cannot be predicted (log2(26) = 4.7 bits per byte at best); a model
that copies predicts the second nearly for free. The control puts *other* random letters
where the second copy was: what the model pays there without anything to copy (a model that
only learned "lowercase letters come next" pays the same for both).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from kvcache.tools.refmodel.corpus import Corpus, load_corpus
from kvcache.tools.refmodel.model import SEQ_LEN
from kvcache.tools.refmodel.tokenizer import BOS_ID

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NGRAM = 32
REPEAT_DISTANCE = 256
MAX_WINDOWS_PER_FILE = 8
QUICK_WINDOWS = 6
MIN_WINDOW = 64
LN2 = math.log(2.0)
PROBE_LETTERS = 200
PROBE_DISTANCE = 400
PROBE_TRIALS = 4
PROBE_LEAD = 100  # held-out bytes before the first copy


@dataclass(frozen=True)
class HeldoutFigures:
    heldout_bpb: float
    unigram_bpb: float
    repeat_span_bpb: float
    novel_bpb: float
    bytes_scored: int
    repeat_bytes: int
    novel_bytes: int
    windows: int
    quick: bool


def heldout_windows(corpus: Corpus, *, quick: bool = False) -> list[list[int]]:
    """Token windows ``[<= SEQ_LEN]`` of the held-out files, in file order.

    ``quick``: the ``QUICK_WINDOWS`` windows with the most repeat-span bytes (ties: the
    earlier), so a small subset still has long-range repeats to score.
    """
    out: list[list[int]] = []
    for f in corpus.heldout:
        ids = [BOS_ID, *corpus.read(f)]
        for i in range(MAX_WINDOWS_PER_FILE):
            w = ids[i * SEQ_LEN : (i + 1) * SEQ_LEN]
            if len(w) >= MIN_WINDOW:
                out.append(w)
    if quick:
        repeats = [int(classify_targets(w)[0].sum()) for w in out]
        best = sorted(range(len(out)), key=lambda i: (-repeats[i], i))[:QUICK_WINDOWS]
        out = [out[i] for i in sorted(best)]
    return out


def classify_targets(ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks ``[len(ids) - 1]`` over targets ``ids[1:]``: (repeat, novel).

    ids: one window of token ids. Target ``t = ids[i]`` (mask index ``i - 1``) is repeat if
    ``ids[i-NGRAM+1 : i+1]`` first occurred ending at ``j < i - REPEAT_DISTANCE``; novel if
    ``ids[i-NGRAM : i]`` does not occur ending before ``i - 1``.
    """
    data = bytes(min(int(t), 255) if int(t) < 256 else 0 for t in ids)
    first_end: dict[bytes, int] = {}
    n = len(ids)
    repeat = torch.zeros(n - 1, dtype=torch.bool)
    novel = torch.zeros(n - 1, dtype=torch.bool)
    for i in range(1, n):
        if ids[i] >= 256:
            continue
        # The context n-gram ending at i - 1 was registered at step i - 1, so look it up
        # before registering the one ending at i.
        if i >= NGRAM:
            ctx = data[i - NGRAM : i]
            novel[i - 1] = first_end.get(ctx, i - 1) >= i - 1
        elif i >= 1:
            novel[i - 1] = False  # too little context to say
        if i + 1 >= NGRAM:
            gram = data[i + 1 - NGRAM : i + 1]
            j = first_end.setdefault(gram, i)
            repeat[i - 1] = j < i - REPEAT_DISTANCE
    return repeat, novel


def unigram_bits(corpus: Corpus) -> torch.Tensor:
    """``[256]`` bits per byte value under the training split's byte frequencies."""
    counts = torch.zeros(256, dtype=torch.float64)
    for f in corpus.train:
        data = torch.frombuffer(bytearray(corpus.read(f)), dtype=torch.uint8)
        counts += torch.bincount(data.long(), minlength=256).double()
    freq = counts + 1.0
    return -(freq / freq.sum()).log2()


@torch.no_grad()
def token_nats(model: PreTrainedModel, ids: Sequence[int]) -> torch.Tensor:
    """``[len(ids) - 1]`` float64 negative log-likelihood of ``ids[1:]`` given the prefix."""
    x = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    logits = model(input_ids=x).logits[0, :-1].double()
    return torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none").cpu()


def evaluate_heldout(
    model: PreTrainedModel, corpus: Corpus | None = None, *, quick: bool = False
) -> dict[str, float | int | bool]:
    """Held-out figures of ``model`` (see the module docstring) as a JSON-ready dict."""
    corpus = load_corpus() if corpus is None else corpus
    uni = unigram_bits(corpus)
    was_training = model.training
    model.eval()
    tot = rep = nov = uni_bits = 0.0
    n_tot = n_rep = n_nov = 0
    windows = heldout_windows(corpus, quick=quick)
    for w in windows:
        nats = token_nats(model, w)
        targets = torch.tensor(w[1:])
        is_byte = targets < 256
        repeat, novel = classify_targets(w)
        tot += float(nats[is_byte].sum())
        n_tot += int(is_byte.sum())
        uni_bits += float(uni[targets[is_byte]].sum())
        rep += float(nats[repeat].sum())
        n_rep += int(repeat.sum())
        nov += float(nats[novel].sum())
        n_nov += int(novel.sum())
    model.train(was_training)

    def bpb(nats: float, n: int) -> float:
        return round(nats / max(n, 1) / LN2, 4)

    figures = HeldoutFigures(
        heldout_bpb=bpb(tot, n_tot),
        unigram_bpb=round(uni_bits / max(n_tot, 1), 4),
        repeat_span_bpb=bpb(rep, n_rep),
        novel_bpb=bpb(nov, n_nov),
        bytes_scored=n_tot,
        repeat_bytes=n_rep,
        novel_bytes=n_nov,
        windows=len(windows),
        quick=quick,
    )
    return asdict(figures)


def copy_probe(model: PreTrainedModel, corpus: Corpus | None = None) -> dict[str, float]:
    """Bits per byte of the first and the second copy of random letters, and of other
    letters in the second copy's place (module docstring), averaged over ``PROBE_TRIALS``
    seeded trials with held-out text from the first held-out file long enough to give each
    trial different text."""
    corpus = load_corpus() if corpus is None else corpus
    between = PROBE_DISTANCE - PROBE_LETTERS
    piece = PROBE_LEAD + between
    text = next(
        d for d in (corpus.read(f) for f in corpus.heldout) if len(d) >= PROBE_TRIALS * piece
    )
    was_training = model.training
    model.eval()
    first = second = control = 0.0
    for trial in range(PROBE_TRIALS):
        rng = random.Random(trial)
        letters = bytes(rng.randrange(ord("a"), ord("z") + 1) for _ in range(PROBE_LETTERS))
        others = bytes(rng.randrange(ord("a"), ord("z") + 1) for _ in range(PROBE_LETTERS))
        lead = text[trial * piece : trial * piece + PROBE_LEAD]
        mid = text[trial * piece + PROBE_LEAD : (trial + 1) * piece]
        a = 1 + PROBE_LEAD  # position of the first copy's first letter
        b = a + PROBE_DISTANCE
        # nats[i - 1] scores ids[i]
        nats = token_nats(model, [BOS_ID, *lead, *letters, *mid, *letters])
        first += float(nats[a : a + PROBE_LETTERS - 1].mean())
        second += float(nats[b : b + PROBE_LETTERS - 1].mean())
        nats = token_nats(model, [BOS_ID, *lead, *letters, *mid, *others])
        control += float(nats[b : b + PROBE_LETTERS - 1].mean())
    model.train(was_training)
    return {
        "first_copy_bpb": round(first / PROBE_TRIALS / LN2, 4),
        "second_copy_bpb": round(second / PROBE_TRIALS / LN2, 4),
        "control_bpb": round(control / PROBE_TRIALS / LN2, 4),
    }


def format_figures(f: dict[str, float | int | bool], probe: dict[str, float] | None = None) -> str:
    lines = [
        f"held-out bits per byte   {f['heldout_bpb']:.3f}  ({f['bytes_scored']} bytes, "
        f"{f['windows']} windows of <= {SEQ_LEN} tokens)",
        f"unigram baseline         {f['unigram_bpb']:.3f}",
        f"repeat-span bytes        {f['repeat_span_bpb']:.3f}  ({f['repeat_bytes']} bytes "
        f"whose {NGRAM}-gram occurred > {REPEAT_DISTANCE} tokens earlier)",
        f"novel bytes              {f['novel_bpb']:.3f}  ({f['novel_bytes']} bytes whose "
        f"preceding {NGRAM}-gram is new)",
    ]
    if probe is not None:
        lines.append(
            f"copy probe               {probe['first_copy_bpb']:.3f} first copy, "
            f"{probe['second_copy_bpb']:.3f} second, {probe['control_bpb']:.3f} other letters "
            f"there ({PROBE_LETTERS} random letters said "
            f"again {PROBE_DISTANCE} tokens later)"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from kvcache.tools.refmodel import load_reference_model

    model, _ = load_reference_model()
    corpus = load_corpus()
    figures = evaluate_heldout(model, corpus, quick=args.quick)
    probe = copy_probe(model, corpus)
    if args.json:
        print(json.dumps({**figures, "copy_probe": probe}, indent=2))
    else:
        print(format_figures(figures, probe))
    return 0
