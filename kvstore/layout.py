"""``KVLayout``: what a chunk of KV cache looks like, and a fingerprint that keys depend on.

Two engines may share cached KV only when everything that determines its bytes agrees:
the model, its attention shape, the dtype, how keys were rotated and which tensor-parallel
shard they hold. All of that lives in one frozen dataclass whose fingerprint is folded
into every key, so KV of different layouts can never be confused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import cache, cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from kvcache.kvstore.errors import LayoutMismatchError

if TYPE_CHECKING:
    import torch

# Names used in stored headers and configs, with each one's bytes per element. They are
# part of the on-disk format: never rename one; add new ones instead. The torch dtypes they
# name are looked up on first use (``dtypes()``): reading headers, as the admin commands
# do, must not cost a torch import.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
}


@cache
def dtypes() -> dict[str, torch.dtype]:
    """Each dtype name of ``DTYPE_SIZES`` -> its torch dtype."""
    import torch

    return {name: getattr(torch, name) for name in DTYPE_SIZES}


@cache
def dtype_names() -> dict[torch.dtype, str]:
    """The inverse of ``dtypes()``."""
    return {v: k for k, v in dtypes().items()}
E = TypeVar("E", bound=Enum)


class AttentionKind(str, Enum):
    MHA = "mha"
    GQA = "gqa"
    MLA = "mla"


class RopeStyle(str, Enum):
    NEOX = "neox"  # rotate halves: pairs (i, i + rotary_dim/2); Llama, Qwen, Mistral
    GPTJ = "gptj"  # rotate interleaved pairs (2i, 2i + 1)


# RopeSpec fields that are left out of ``to_dict`` (and so of fingerprints) while unset:
# added after layouts were first keyed, so layouts that do not use them keep their keys.
_ROPE_OPTIONAL = ("low_freq_factor", "high_freq_factor", "original_max_position")


def _enum(cls: type[E], value: object, what: str) -> E:
    try:
        return cls(value)
    except ValueError:
        known = ", ".join(repr(m.value) for m in cls)
        raise LayoutMismatchError(f"unknown {what} {value!r}; use one of {known}") from None


def _check_types(obj: object, fields: dict[str, Any]) -> None:
    """``LayoutMismatchError`` for a field whose value is not of its type (ints are
    accepted for floats, bools for nothing)."""
    for name, tp in fields.items():
        value = getattr(obj, name)
        allowed = tp.__args__ if hasattr(tp, "__args__") else (tp,)
        if float in allowed:
            allowed = (*allowed, int)
        if isinstance(value, bool) or not isinstance(value, allowed):
            names = " or ".join("None" if a is type(None) else a.__name__ for a in allowed
                                if not (a is int and float in allowed))
            raise LayoutMismatchError(
                f"{type(obj).__name__}.{name} must be {names}, got {value!r}")


@dataclass(frozen=True)
class RopeSpec:
    """How keys were rotated, so cached keys can later be shifted to new positions (and
    coded before RoPE). ``llama3`` scaling (Llama 3.1+) needs its three extra parameters
    for the frequencies to be known; without them shifts need the model's ``inv_freq``."""

    theta: float = 10000.0
    style: RopeStyle = RopeStyle.NEOX
    rotary_dim: int | None = None  # None: the whole head_dim
    scaling_type: str | None = None  # e.g. "llama3", "linear", "yarn"
    scaling_factor: float = 1.0
    # llama3 scaling: frequencies with wavelengths between original_max_position /
    # high_freq_factor and original_max_position / low_freq_factor are blended
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "style", _enum(RopeStyle, self.style, "rope style"))
        _check_types(self, {"theta": float, "scaling_factor": float, "rotary_dim": int | None,
                            "scaling_type": str | None, "low_freq_factor": float | None,
                            "high_freq_factor": float | None,
                            "original_max_position": int | None})
        # 10000 and 10000.0 are one frequency: one fingerprint, whichever the caller wrote
        for name in ("theta", "scaling_factor", "low_freq_factor", "high_freq_factor"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        if self.theta <= 0:
            raise LayoutMismatchError(f"rope theta must be > 0, got {self.theta}")
        if self.rotary_dim is not None and (self.rotary_dim <= 0 or self.rotary_dim % 2):
            raise LayoutMismatchError(
                f"rope rotary_dim must be even and > 0, got {self.rotary_dim}"
            )
        llama3 = [getattr(self, f) for f in _ROPE_OPTIONAL]
        if any(v is not None for v in llama3):
            if self.scaling_type != "llama3" or any(v is None for v in llama3):
                raise LayoutMismatchError(
                    f"{', '.join(_ROPE_OPTIONAL)} go together, with scaling_type 'llama3'"
                )
            lo, hi, orig = llama3
            if not (0 < lo < hi and orig > 0 and self.scaling_factor > 0):
                raise LayoutMismatchError(
                    f"llama3 RoPE needs 0 < low_freq_factor < high_freq_factor and "
                    f"original_max_position > 0, got {lo}, {hi}, {orig}"
                )

    @property
    def llama3_params(self) -> tuple[float, float, int] | None:
        """(low_freq_factor, high_freq_factor, original_max_position), when all are set."""
        if self.original_max_position is None:
            return None
        assert self.low_freq_factor is not None and self.high_freq_factor is not None
        return self.low_freq_factor, self.high_freq_factor, self.original_max_position


@dataclass(frozen=True)
class KVLayout:
    """Shape, dtype and provenance of one model's KV cache (one TP shard of it).

    The canonical chunk tensor is ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]``
    (K at index 0, V at index 1). For MLA it is ``[num_layers, num_tokens, latent_dim]``.

    ``page_format``: None for canonical K/V. Otherwise the chunk tensor has the canonical
    shape but holds an engine's pages as they are (``num_tokens`` a whole number of
    blocks), in the page format this names (engine, kernel, block size): only that
    engine can use them, and only lossless codecs store them (``codec_for``).
    """

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    attention: AttentionKind = AttentionKind.GQA
    latent_dim: int | None = None  # MLA only
    rope: RopeSpec | None = field(default_factory=RopeSpec)
    tp_rank: int = 0
    tp_size: int = 1
    page_format: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention", _enum(AttentionKind, self.attention, "attention"))
        if isinstance(self.rope, dict):
            try:
                object.__setattr__(self, "rope", RopeSpec(**self.rope))
            except TypeError as e:
                raise LayoutMismatchError(f"not a RopeSpec: {e}") from None
        _check_types(self, {"model_id": str, "num_layers": int, "num_kv_heads": int,
                            "head_dim": int, "dtype": str, "latent_dim": int | None,
                            "rope": RopeSpec | None, "tp_rank": int, "tp_size": int})
        if not self.model_id:
            raise LayoutMismatchError("model_id must be a non-empty string")
        for name in ("num_layers", "num_kv_heads", "head_dim", "tp_size"):
            if getattr(self, name) <= 0:
                raise LayoutMismatchError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.dtype not in DTYPE_SIZES:
            raise LayoutMismatchError(
                f"unsupported dtype {self.dtype!r}; use one of {sorted(DTYPE_SIZES)}"
            )
        if not 0 <= self.tp_rank < self.tp_size:
            raise LayoutMismatchError(
                f"tp_rank must be in [0, tp_size={self.tp_size}), got {self.tp_rank}"
            )
        if self.attention is AttentionKind.MLA and not self.latent_dim:
            raise LayoutMismatchError("MLA layouts need latent_dim > 0")

    # -- derived -------------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return dtypes()[self.dtype]

    @property
    def is_mla(self) -> bool:
        return self.attention is AttentionKind.MLA

    def chunk_shape(self, num_tokens: int) -> tuple[int, ...]:
        """Shape of the canonical chunk tensor holding ``num_tokens`` tokens."""
        if self.is_mla:
            assert self.latent_dim is not None
            return (self.num_layers, num_tokens, self.latent_dim)
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)

    @property
    def token_dim(self) -> int:
        """Index of the token axis in the canonical chunk tensor."""
        return 1 if self.is_mla else 2

    @property
    def bytes_per_token(self) -> int:
        elems = 1
        for d in self.chunk_shape(1):
            elems *= d
        return elems * DTYPE_SIZES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["page_format"] is None:  # canonical layouts keep the fingerprints they had
            del d["page_format"]
        d["attention"] = self.attention.value
        if self.rope is not None:
            d["rope"]["style"] = self.rope.style.value
            for f in _ROPE_OPTIONAL:
                if d["rope"][f] is None:
                    del d["rope"][f]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVLayout:
        d = dict(d)
        rope = d.get("rope")
        if isinstance(rope, dict):
            d["rope"] = RopeSpec(**rope)
        try:
            return cls(**d)
        except TypeError as e:
            raise LayoutMismatchError(f"not a KVLayout: {e}") from e

    @cached_property
    def fingerprint(self) -> str:
        """Stable 16-byte hex digest of every field: equal across processes and machines.
        Computed once per instance (the instance is frozen): keys fold it in per chunk."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()

    def check_chunk(self, chunk: torch.Tensor, num_tokens: int | None = None) -> int:
        """Raise ``LayoutMismatchError`` unless ``chunk`` is a canonical chunk of this layout.

        chunk: ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]`` (MLA:
        ``[num_layers, num_tokens, latent_dim]``) of ``self.torch_dtype``.
        Returns the number of tokens it holds.
        """
        import torch

        if not isinstance(chunk, torch.Tensor):
            raise LayoutMismatchError(f"expected a torch.Tensor, got {type(chunk).__name__}")
        if chunk.dtype != self.torch_dtype:
            raise LayoutMismatchError(
                f"chunk dtype {chunk.dtype} does not match layout dtype {self.dtype} "
                f"of {self.model_id!r}; convert it with .to({self.torch_dtype})"
            )
        n = chunk.shape[self.token_dim] if chunk.dim() > self.token_dim else -1
        expected = self.chunk_shape(n if num_tokens is None else num_tokens)
        if tuple(chunk.shape) != expected or n <= 0:
            names = (
                "[layers, tokens, latent_dim]"
                if self.is_mla
                else "[layers, 2, tokens, kv_heads, head_dim]"
            )
            raise LayoutMismatchError(
                f"chunk shape {tuple(chunk.shape)} does not match layout {names} = "
                f"{expected} of {self.model_id!r}"
            )
        return n
