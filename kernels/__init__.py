"""Triton kernels and their torch references (quantization, paged copies, RoPE, blending)."""
