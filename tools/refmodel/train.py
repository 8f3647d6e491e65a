"""``kvcache refmodel train``: train the reference model from the stdlib corpus.

Recipe (deterministic for a given seed on a given corpus and thread count):
- every training file becomes ``<bos> bytes <eos>``; the files are concatenated in sorted
  order and each step draws ``batch_size`` windows of ``SEQ_LEN + 1`` tokens at seeded
  random offsets (so most windows lie inside one file);
- a copy circuit (a previous-token head feeding an induction head, ``copy_circuit.py``) is
  written into heads 0 of layers 0 and 1 before the first step and restored after every
  step: in this budget gradient descent never found long-range copying by itself (see
  docs/reference-model.md), so it is set by hand and the rest is trained around it;
- copy shaping: a fraction ``copy_fraction`` of the windows start with a span of 257 to
  ``seq_len // 2`` tokens said twice in a row. Plain code repeats itself too, but rarely at
  that range; the repeats make the circuit worth using for the trained layers;
- AdamW, linear warm-up then cosine decay to 10%, gradient clipping at 1.0, bfloat16
  autocast on CPU (AMX makes it ~4x faster than float32), float32 master weights;
- a fixed number of steps; ``--minutes`` is only a safety budget: training that hits it
  stops early and the log says so.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvcache.tools.refmodel.copy_circuit import install_copy_circuit
from kvcache.tools.refmodel.corpus import Corpus, load_corpus
from kvcache.tools.refmodel.model import (
    CHECKPOINT_DIR,
    SEQ_LEN,
    build_model,
    load_checkpoint,
    reference_config,
    save_checkpoint,
)
from kvcache.tools.refmodel.tokenizer import BOS_ID, EOS_ID

# Training threads are fixed: CPU reductions may split work differently with another count.
NUM_THREADS = 2
# Repeated spans are longer than this, so each repeated token has its source > 256 back.
COPY_MIN_DISTANCE = 257


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 700
    batch_size: int = 8
    seq_len: int = SEQ_LEN
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    copy_fraction: float = 0.5
    copy_circuit: bool = True
    seed: int = 0
    minutes: float = 15.0
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be > 0")
        if self.seq_len < 2 * COPY_MIN_DISTANCE:
            raise ValueError(f"seq_len must be >= {2 * COPY_MIN_DISTANCE} for copy shaping")
        if not 0.0 <= self.copy_fraction <= 1.0:
            raise ValueError("copy_fraction must be in [0, 1]")


def token_stream(corpus: Corpus, split: str = "train") -> torch.Tensor:
    """``[N]`` int64: each file of ``split`` as ``<bos> bytes <eos>``, in sorted order."""
    files = corpus.train if split == "train" else corpus.heldout
    parts: list[torch.Tensor] = []
    for f in files:
        data = torch.frombuffer(bytearray(corpus.read(f)), dtype=torch.uint8).long()
        parts += [torch.tensor([BOS_ID]), data, torch.tensor([EOS_ID])]
    return torch.cat(parts)


def _repeat_prefix(window: torch.Tensor, rng: random.Random) -> None:
    """Make ``window`` ``[T]`` start with a span of ``COPY_MIN_DISTANCE``-``T // 2``
    tokens immediately said again: every token of the second copy repeats one more than
    256 tokens back (the text after the second copy is left as it was)."""
    t = window.shape[0]
    span = rng.randint(COPY_MIN_DISTANCE, t // 2)
    window[span : 2 * span] = window[:span].clone()


def batches(stream: torch.Tensor, cfg: TrainConfig, rng: random.Random):
    """Yield ``[batch_size, seq_len + 1]`` windows forever (inputs and shifted labels)."""
    n = stream.shape[0] - cfg.seq_len - 1
    while True:
        rows = []
        for _ in range(cfg.batch_size):
            start = rng.randrange(n)
            w = stream[start : start + cfg.seq_len + 1].clone()
            if rng.random() < cfg.copy_fraction:
                _repeat_prefix(w, rng)
            rows.append(w)
        yield torch.stack(rows)


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train(
    cfg: TrainConfig,
    corpus: Corpus,
    *,
    model_config: Any = None,
    progress: bool = True,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a model; returns it and the training log (loss curve, timing, budget)."""
    seed_everything(cfg.seed)
    model = build_model(model_config if model_config is not None else reference_config())
    circuit = install_copy_circuit(model, seed=cfg.seed) if cfg.copy_circuit else None
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    stream = token_stream(corpus, "train")
    rng = random.Random(cfg.seed)
    data = batches(stream, cfg, rng)
    curve: list[dict[str, float]] = []
    started = time.perf_counter()
    budget_s = cfg.minutes * 60.0
    stopped_early = False
    step = 0
    window_loss = 0.0
    window_n = 0
    for step in range(cfg.steps):
        if time.perf_counter() - started > budget_s:
            stopped_early = True
            break
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        batch = next(data)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if circuit is not None:
            circuit.restore(model)  # AdamW moved (and decayed) the circuit's entries
        window_loss += loss.item()
        window_n += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            elapsed = time.perf_counter() - started
            bpb = window_loss / window_n / math.log(2)
            curve.append(
                {"step": step + 1, "train_bpb": round(bpb, 4), "elapsed_s": round(elapsed, 1)}
            )
            if progress:
                print(
                    f"step {step + 1}/{cfg.steps}  train {bpb:.3f} bpb  {elapsed:.0f}s", flush=True
                )
            window_loss, window_n = 0.0, 0
    steps_done = step + (0 if stopped_early else 1)
    wall = time.perf_counter() - started
    model.eval()
    log = {
        "train_config": asdict(cfg),
        "steps_done": steps_done,
        "stopped_early_by_budget": stopped_early,
        "tokens_seen": steps_done * cfg.batch_size * cfg.seq_len,
        "copy_circuit_entries": circuit.frozen_entries() if circuit is not None else 0,
        "parameters": sum(p.numel() for p in model.parameters()),
        "wall_time_s": round(wall, 1),
        "loss_curve": curve,
    }
    return model, log


def environment() -> dict[str, str]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "threads": str(NUM_THREADS),
    }


def main(args: argparse.Namespace) -> int:
    from kvcache.tools.refmodel.evaluate import copy_probe, evaluate_heldout, format_figures

    overrides = {"steps": args.steps} if args.steps else {}
    cfg = TrainConfig(seed=args.seed, minutes=args.minutes, **overrides)
    out: Path = args.out if args.out is not None else CHECKPOINT_DIR
    corpus = load_corpus()
    model, log = train(cfg, corpus, progress=not args.json)
    full_log: dict[str, Any] = {
        # the checkpoint's own folder is where it ends up, not part of how it was made
        "command": " ".join(["kvcache", "refmodel", "train", "--out", "DIR",
                             "--minutes", f"{args.minutes:g}", "--seed", str(args.seed),
                             *(["--steps", str(args.steps)] if args.steps else [])]),
        "seed": cfg.seed,
        **log,
        "environment": environment(),
        "corpus": corpus.describe(),
    }
    # Save before the (minutes-long) evaluation so an interrupted run keeps its weights.
    save_checkpoint(model, out, full_log)
    print("evaluating on the held-out files ...", file=sys.stderr)
    # Figures of the weights as saved (bfloat16, upcast), which is what users load.
    saved = load_checkpoint(out)
    full_log["heldout_eval"] = evaluate_heldout(saved, corpus)
    full_log["heldout_eval_quick"] = evaluate_heldout(saved, corpus, quick=True)
    full_log["copy_probe"] = copy_probe(saved, corpus)
    save_checkpoint(model, out, full_log)
    if args.json:
        print(
            json.dumps({**full_log["heldout_eval"], "copy_probe": full_log["copy_probe"]}, indent=2)
        )
    else:
        print(format_figures(full_log["heldout_eval"], full_log["copy_probe"]))
        print(f"wrote {out}")
    return 0
