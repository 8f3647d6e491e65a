"""Which implementation a launcher runs: Triton on CUDA, the torch reference elsewhere.

``impl="auto"`` picks Triton for CUDA tensors when triton imports and the torch reference
otherwise. ``impl="triton"`` forces the kernel, also on CPU tensors when
``TRITON_INTERPRET=1`` was set before triton was first imported (how the tests run every
kernel without a GPU). ``impl="torch"`` forces the reference.

triton is optional: CUDA builds of torch install the triton they were built with, CPU
builds run the torch references and need triton only for the tests (the ``test`` extra).
Nothing imports it until a Triton kernel is launched.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

Impl = Literal["auto", "triton", "torch"]
IMPLS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(impl: str, device: torch.device) -> bool:
    """True when the Triton kernel should run for tensors on ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "triton":
        if not triton_available():
            raise RuntimeError(
                "impl='triton' but triton is not installed: CUDA builds of torch bring it; "
                "elsewhere pip install triton (or the package's test extra)")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"impl='triton' on {device.type} tensors needs TRITON_INTERPRET=1 in the "
                "environment before triton is imported (or CUDA tensors)")
        return True
    return device.type == "cuda" and triton_available()


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# Same-width integer types: the copy kernels move bits, never values, so bf16 and fp8
# (which the interpreter mishandles) travel as integers.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` reinterpreted as the signed/unsigned integer type of the same width (a view)."""
    return t.view(_BITS[t.element_size()])
