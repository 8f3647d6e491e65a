"""The reference model: a small byte-level Llama trained here on the Python standard library.

``load_reference_model()`` returns the shipped checkpoint as a float32 transformers model
(eval mode) and its ``ByteTokenizer``, with no network access. See docs/reference-model.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvcache.tools.refmodel.model import CHECKPOINT_DIR, load_checkpoint, weights_digest
from kvcache.tools.refmodel.tokenizer import ByteTokenizer

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

__all__ = ["CHECKPOINT_DIR", "ByteTokenizer", "load_reference_model", "reference_model_id"]


def load_reference_model(
    directory: Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, ByteTokenizer]:
    """(model, tokenizer) of the checkpoint in ``directory`` (default: the shipped one)."""
    model = load_checkpoint(CHECKPOINT_DIR if directory is None else Path(directory), dtype)
    return model, ByteTokenizer()


def reference_model_id(directory: Path | None = None) -> str:
    """A model id for ``KVLayout``: names the weights, so retrained weights never share KV."""
    d = CHECKPOINT_DIR if directory is None else Path(directory)
    return f"kvcache-refmodel/{weights_digest(d)}"
