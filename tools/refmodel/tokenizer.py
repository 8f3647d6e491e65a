"""Byte-level tokenizer of the reference model: ids 0-255 are bytes, then a few specials.

Any text round-trips exactly (UTF-8 bytes in, the same bytes out), so bits per token *is*
bits per byte and loss figures compare across tokenizers without a conversion factor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

BOS_ID = 256  # start of a document
EOS_ID = 257  # end of a document
PAD_ID = 258
SEP_ID = 259  # separates the chunks of a multi-chunk (RAG-style) prompt
NUM_SPECIAL = 4
VOCAB_SIZE = 256 + NUM_SPECIAL
SPECIAL_NAMES = {BOS_ID: "<bos>", EOS_ID: "<eos>", PAD_ID: "<pad>", SEP_ID: "<sep>"}


class ByteTokenizer:
    """Text ↔ token ids. ``encode`` never adds specials unless asked."""

    vocab_size = VOCAB_SIZE
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    pad_token_id = PAD_ID
    sep_token_id = SEP_ID

    def encode(
        self, text: str | bytes, *, add_bos: bool = False, add_eos: bool = False
    ) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = list(data)
        if add_bos:
            ids.insert(0, BOS_ID)
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def decode_bytes(self, ids: Iterable[int], *, skip_special: bool = True) -> bytes:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            elif not skip_special:
                out += SPECIAL_NAMES[i].encode()
            elif i >= VOCAB_SIZE or i < 0:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {VOCAB_SIZE})")
        return bytes(out)

    def decode(self, ids: Iterable[int] | torch.Tensor, *, skip_special: bool = True) -> str:
        """ids: ``[T]`` ints. Invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    def __call__(self, text: str, *, add_bos: bool = True) -> torch.Tensor:
        """``[1, T]`` int64 ids, ready for ``model(input_ids=...)``."""
        return torch.tensor([self.encode(text, add_bos=add_bos)], dtype=torch.long)

    @staticmethod
    def num_bytes(ids: Sequence[int]) -> int:
        """How many text bytes ``ids`` stand for (specials stand for none)."""
        return sum(1 for i in ids if int(i) < 256)
